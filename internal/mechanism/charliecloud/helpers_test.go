package charliecloud

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/mechanism/mechtest"
	"github.com/ci-exec/ci-exec/internal/policy"
)

const (
	testUser     = "ciuser"
	testHome     = "/home/ciuser"
	testRegistry = "127.0.0.1:5443"
	userPassword = "pass-word-123"
	jobToken     = "glcbt-job-token-0123456789"
)

// newRuntime is the runtime under test for user ciuser.
func newRuntime(cfg config.Mechanism, hostEnv map[string]string) *Runtime {
	return New(cfg, config.UserInfo{Name: testUser, Home: testHome}, hostEnv, time.Second)
}

// creds are chosen from the user's CH_IMAGE_* variables (user u) or the
// job token; secrets must never leak.
var (
	creds   = mechtest.Creds{Names: credentialVariables, User: "u"}
	secrets = mechtest.Secrets{userPassword, jobToken}
)

// userCredential is a credential from the user's CH_IMAGE_* variables.
func userCredential(t *testing.T) auth.Credential {
	return creds.FromUser(t, testRegistry, userPassword)
}

// jobTokenCredential is gitlab-ci-token with the job's token, chosen because
// the image's registry is the job's trusted CI_REGISTRY.
func jobTokenCredential(t *testing.T) auth.Credential {
	return creds.JobToken(t, testRegistry, jobToken)
}

// entry is one file, directory or symlink that makeTree creates under a root.
type entry struct {
	path    string
	content string
	link    string
	dir     bool
	mode    os.FileMode
}

func makeTree(t *testing.T, root string, entries []entry) {
	t.Helper()
	for _, e := range entries {
		p := filepath.Join(root, e.path)
		require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		switch {
		case e.dir:
			mode := e.mode
			if mode == 0 {
				mode = 0o755
			}
			require.NoError(t, os.MkdirAll(p, 0o755))
			require.NoError(t, os.Chmod(p, mode))
		case e.link != "":
			require.NoError(t, os.Symlink(e.link, p))
		default:
			mode := e.mode
			if mode == 0 {
				mode = 0o644
			}
			require.NoError(t, os.WriteFile(p, []byte(e.content), mode))
			require.NoError(t, os.Chmod(p, mode))
		}
	}
}

func file(path, content string, mode os.FileMode) entry {
	return entry{path: path, content: content, mode: mode}
}
func dirEntry(path string, mode os.FileMode) entry { return entry{path: path, dir: true, mode: mode} }
func symlink(path, target string) entry            { return entry{path: path, link: target} }

// fakeChImage stands in for ch-image 0.31's pull. Its behaviour is set by
// files in the record dir R (pull-gate: a FIFO to wait on, pull-fail, pull-nowrite, no-env,
// pull-hook: shell code run on the new image dir $d before it appears, with
// $OUTSIDE a directory outside the storage), and it records what it was
// given there. Like ch-image, it stores NAME in STORAGE/img/<NAME with "/"
// as "%" and ":" as "+">, and the image appears whole (made aside, then
// renamed).
const fakeChImage = `#!/bin/sh
R=@RECORD@
echo pull >> "$R/pulls"
printf '%s\n' "$@" > "$R/pull-argv"
env > "$R/pull-env"
readlink "/proc/$$/fd/0" > "$R/pull-stdin"
S=
for a; do
	[ "$prev" = -s ] && S=$a
	prev=$a
done
name=$prev
[ -p "$R/pull-gate" ] && read gate < "$R/pull-gate"
echo "pulling image:    $name"
if [ -f "$R/pull-fail" ]; then cat "$R/pull-fail" >&2; exit 1; fi
[ -f "$R/pull-nowrite" ] && { mkdir -p "$S/img"; exit 0; }
OUTSIDE="$(dirname "$S")/outside"
final="$S/img/$(printf '%s' "$name" | sed 's|/|%|g; s|:|+|g')"
d="$final.partial"
mkdir -p "$d/bin" "$d/ch" "$d/etc" || exit 1
printf '#!' > "$d/bin/busybox"; chmod 755 "$d/bin/busybox"
ln -s /bin/busybox "$d/bin/sh"
echo "$name" > "$d/etc/image-name"
[ -f "$R/no-env" ] || echo 'PATH=/bin' > "$d/ch/environment"
[ -f "$R/pull-hook" ] && . "$R/pull-hook"
mv "$d" "$final"
echo "done"
`

// fakeChConvert stands in for `ch-convert -i dir -o squash DIR OUT`. It
// records its arguments, environment and the tree of DIR, and writes a
// SquashFS superblock (from R/sqfs-header) followed by that tree to OUT.
// Behaviour files: convert-fail, convert-garbage.
const fakeChConvert = `#!/bin/sh
R=@RECORD@
echo convert >> "$R/converts"
printf '%s\n' "$@" > "$R/convert-argv"
env > "$R/convert-env"
readlink "/proc/$$/fd/0" > "$R/convert-stdin"
for a; do dir=$out; out=$a; done
if [ -f "$R/convert-fail" ]; then cat "$R/convert-fail" >&2; exit 1; fi
[ -e "$out" ] && { echo "error: $out exists" >&2; exit 1; }
(cd "$dir" && find . | LC_ALL=C sort) > "$R/convert-tree" || exit 1
if [ -f "$R/convert-garbage" ]; then printf '%0200d' 0 > "$out"; exit 0; fi
cat "$R/sqfs-header" "$R/convert-tree" > "$out"
`

// sqfsHeader is a SquashFS superblock that imagecache.ValidSquashFS
// accepts: the magic and bytes_used (offset 40) no larger than the file.
func sqfsHeader() []byte {
	b := make([]byte, 96)
	copy(b, "hsqs")
	binary.LittleEndian.PutUint64(b[40:48], 96)
	return b
}

// fakeCharliecloud is an application_path with fake ch-run, ch-image and
// ch-convert, and the runtime that uses them.
type fakeCharliecloud struct {
	*mechtest.Fake
	r *Runtime
}

// newFake installs the fakes; cfg may set tmp_dir and the like (the
// application_path and image_storage_dir are filled in).
func newFake(t *testing.T, cfg config.Mechanism, hostEnv map[string]string) *fakeCharliecloud {
	t.Helper()
	f := &fakeCharliecloud{Fake: mechtest.NewFake(t, Name, testUser, testMounts)}
	writeScript(t, filepath.Join(f.App, "ch-run"), fakeChRun("0.31", help031), 0o755)
	f.Install(t, "ch-image", fakeChImage)
	f.Install(t, "ch-convert", fakeChConvert)
	f.Set(t, "sqfs-header", string(sqfsHeader()))
	f.r = newRuntime(f.Config(cfg), hostEnv)
	f.Attach(f.r, f.r.Storage)
	return f
}

func (f *fakeCharliecloud) converts(t *testing.T) int { return f.Count(t, "converts") }

// stored is the storage dir of ref's image at digest.
func (f *fakeCharliecloud) stored(ref policy.Ref, digest string) string {
	return filepath.Join(f.Storage, "img", forPath(ref.FamiliarAtDigest(digest)))
}

// jobCopy is the storage dir of a job's own copy.
func (f *fakeCharliecloud) jobCopy(key string) string {
	return filepath.Join(f.Storage, "img", "ci-exec-job+"+key)
}

// mnt is a job's SquashFS mount point.
func (f *fakeCharliecloud) mnt(key string) string { return filepath.Join(f.Jobs, key+".mnt") }
