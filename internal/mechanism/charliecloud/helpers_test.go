package charliecloud

import (
	"encoding/binary"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/imagecache"
	"github.com/ci-exec/ci-exec/internal/job"
	"github.com/ci-exec/ci-exec/internal/mechanism"
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

// userCredential is a credential from the user's CH_IMAGE_* variables.
func userCredential(t *testing.T) auth.Credential {
	return userCredentialFor(t, testRegistry, userPassword)
}

func userCredentialFor(t *testing.T, registry, password string) auth.Credential {
	t.Helper()
	j := &job.Job{Vars: map[string]string{"CH_IMAGE_USERNAME": "u", "CH_IMAGE_PASSWORD": password}}
	c, err := auth.Choose(j, registry, newRuntime(config.Mechanism{}, nil).CredentialVariables())
	require.NoError(t, err)
	require.Equal(t, auth.UserVariables, c.Source)
	return c
}

// jobTokenCredential is gitlab-ci-token with the job's token, chosen because
// the image's registry is the job's trusted CI_REGISTRY.
func jobTokenCredential(t *testing.T) auth.Credential { return jobTokenFor(t, testRegistry) }

func jobTokenFor(t *testing.T, registry string) auth.Credential {
	t.Helper()
	j := &job.Job{
		Vars: map[string]string{},
		Response: &job.Response{
			Token:     jobToken,
			Variables: []job.Variable{{Key: "CI_REGISTRY", Value: registry, Public: true}},
		},
	}
	c, err := auth.Choose(j, registry, newRuntime(config.Mechanism{}, nil).CredentialVariables())
	require.NoError(t, err)
	require.Equal(t, auth.JobToken, c.Source)
	require.Equal(t, auth.JobTokenUser, c.Username)
	return c
}

// parsedRef is a validated reference, as Prepare hands it to Pull.
func parsedRef(t *testing.T, s string) mechanism.Ref {
	t.Helper()
	ref, err := mechanism.ParseImage(s)
	require.NoError(t, err)
	return ref
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

// Digests the fake registry serves.
var (
	digest1 = "sha256:" + strings.Repeat("1", 64)
	digest2 = "sha256:" + strings.Repeat("2", 64)
)

// fakeRegistry answers the manifest HEAD requests of tag resolution over
// HTTPS with a self-signed certificate (so only a registry listed as
// insecure, whose certificate is not checked, can be reached), optionally
// behind basic authentication.
type fakeRegistry struct {
	host string

	mu         sync.Mutex
	tags       map[string]string // "ci/tiny:latest" -> digest
	user, pass string
	heads      int
}

// quietLog drops the server's "TLS handshake error" lines.
var quietLog = log.New(io.Discard, "", 0)

func startRegistry(t *testing.T) *fakeRegistry {
	t.Helper()
	g := &fakeRegistry{tags: map[string]string{"ci/tiny:latest": digest1}}
	srv := httptest.NewUnstartedServer(g)
	srv.Config.ErrorLog = quietLog
	srv.StartTLS()
	t.Cleanup(srv.Close)
	g.host = strings.TrimPrefix(srv.URL, "https://")
	return g
}

func (g *fakeRegistry) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.user != "" {
		if u, p, ok := r.BasicAuth(); !ok || u != g.user || p != g.pass {
			w.Header().Set("WWW-Authenticate", `Basic realm="fake"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
	}
	if r.URL.Path == "/v2/" {
		return
	}
	repo, tag, ok := strings.Cut(strings.TrimPrefix(r.URL.Path, "/v2/"), "/manifests/")
	if !ok || r.Method != http.MethodHead {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	g.heads++
	d, found := g.tags[repo+":"+tag]
	if !found {
		w.WriteHeader(http.StatusNotFound)
		return
	}
	w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
	w.Header().Set("Content-Length", "321")
	w.Header().Set("Docker-Content-Digest", d)
	w.WriteHeader(http.StatusOK)
}

// set points a tag at a digest.
func (g *fakeRegistry) set(tag, digest string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.tags[tag] = digest
}

// requireLogin makes every request need these basic credentials.
func (g *fakeRegistry) requireLogin(user, pass string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.user, g.pass = user, pass
}

// resolved is how many manifest HEAD requests arrived.
func (g *fakeRegistry) resolved() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.heads
}

// ref is the tiny test image on this registry.
func (g *fakeRegistry) ref(t *testing.T) mechanism.Ref { return parsedRef(t, g.host+"/ci/tiny:latest") }

// closedPort is a loopback address nothing listens on.
func closedPort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	require.NoError(t, l.Close())
	return addr
}

// fakeChImage stands in for ch-image 0.31's pull. Its behaviour is set by
// files in the record dir R (pull-sleep, pull-fail, pull-nowrite, no-env,
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
[ -f "$R/pull-sleep" ] && sleep "$(cat "$R/pull-sleep")"
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
// Behaviour files: convert-sleep, convert-fail, convert-garbage.
const fakeChConvert = `#!/bin/sh
R=@RECORD@
echo convert >> "$R/converts"
printf '%s\n' "$@" > "$R/convert-argv"
env > "$R/convert-env"
readlink "/proc/$$/fd/0" > "$R/convert-stdin"
for a; do dir=$out; out=$a; done
[ -f "$R/convert-sleep" ] && sleep "$(cat "$R/convert-sleep")"
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
	app, rec, storage, scripts, images string
	r                                  *Runtime
}

// newFake installs the fakes; cfg may set tmp_dir and the like (the
// application_path and image_storage_dir are filled in).
func newFake(t *testing.T, cfg config.Mechanism, hostEnv map[string]string) *fakeCharliecloud {
	t.Helper()
	base := t.TempDir()
	f := &fakeCharliecloud{
		app:     filepath.Join(base, "app"),
		rec:     filepath.Join(base, "record"),
		scripts: filepath.Join(base, "scripts"),
		images:  filepath.Join(base, "images"),
	}
	for _, d := range []string{f.app, f.rec, f.scripts, f.images} {
		require.NoError(t, os.Mkdir(d, 0o755))
	}
	quoted := "'" + f.rec + "'"
	writeScript(t, filepath.Join(f.app, "ch-run"), fakeChRun("0.31", help031), 0o755)
	require.NoError(t, os.WriteFile(filepath.Join(f.app, "ch-image"), []byte(strings.ReplaceAll(fakeChImage, "@RECORD@", quoted)), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(f.app, "ch-convert"), []byte(strings.ReplaceAll(fakeChConvert, "@RECORD@", quoted)), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(f.rec, "sqfs-header"), sqfsHeader(), 0o644))
	cfg.ApplicationPath = f.app
	cfg.ImageStorageDir = f.images
	f.r = newRuntime(cfg, hostEnv)
	f.storage = f.r.Storage
	return f
}

// set writes a behaviour file.
func (f *fakeCharliecloud) set(t *testing.T, name, content string) {
	t.Helper()
	require.NoError(t, os.WriteFile(filepath.Join(f.rec, name), []byte(content), 0o644))
}

// lines reads a record file as lines.
func (f *fakeCharliecloud) lines(t *testing.T, name string) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(f.rec, name))
	require.NoError(t, err)
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

// count is how many lines a record file has (0 when missing): how often
// a fake ran.
func (f *fakeCharliecloud) count(t *testing.T, name string) int {
	t.Helper()
	if _, err := os.Stat(filepath.Join(f.rec, name)); os.IsNotExist(err) {
		return 0
	}
	return len(f.lines(t, name))
}

func (f *fakeCharliecloud) pulls(t *testing.T) int    { return f.count(t, "pulls") }
func (f *fakeCharliecloud) converts(t *testing.T) int { return f.count(t, "converts") }

// stored is the storage dir of ref's image at digest.
func (f *fakeCharliecloud) stored(ref mechanism.Ref, digest string) string {
	return filepath.Join(f.storage, "img", forPath(ref.FamiliarAtDigest(digest)))
}

// jobCopy is the storage dir of a job's own copy.
func (f *fakeCharliecloud) jobCopy(key string) string {
	return filepath.Join(f.storage, "img", "ci-exec-job+"+key)
}

// mnt is a job's SquashFS mount point.
func (f *fakeCharliecloud) mnt(key string) string { return filepath.Join(f.scripts, key+".mnt") }

// storeRoot is the user's store of converted images.
func (f *fakeCharliecloud) storeRoot() string {
	return filepath.Join(f.images, testUser+".ci-exec", "charliecloud")
}

// store opens the user's store as the runtime does.
func (f *fakeCharliecloud) store(t *testing.T) *imagecache.Store {
	t.Helper()
	st, err := f.r.Store()
	require.NoError(t, err)
	require.Equal(t, f.storeRoot(), st.Root)
	return st
}

// ls lists a directory's names (none when it does not exist).
func ls(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if os.IsNotExist(err) {
		return nil
	}
	require.NoError(t, err)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}
