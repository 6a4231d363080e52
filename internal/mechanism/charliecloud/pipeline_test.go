package charliecloud

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/joblog"
	"github.com/ci-exec/ci-exec/internal/mechanism"
)

// These tests run Pull, Convert, Command and Release against shell-script
// stand-ins for ch-run, ch-image and ch-convert (no Charliecloud needed).

const tinyStored = "127.0.0.1+5443%ci%tiny+latest"
const fatManifest = `{"manifests":[{"digest":"sha256:aa"}]}`

type fakeCharliecloud struct {
	app, record, storage, scripts string
	r                             *Runtime
}

// newFake installs the fake programs. pullBody is the end of the fake
// ch-image: "make_image" creates the image, anything else is run as is.
func newFake(t *testing.T, pullBody string, hostEnv map[string]string) *fakeCharliecloud {
	t.Helper()
	base := t.TempDir()
	f := &fakeCharliecloud{
		app:     filepath.Join(base, "app"),
		record:  filepath.Join(base, "record"),
		scripts: filepath.Join(base, "scripts"),
	}
	require.NoError(t, os.Mkdir(f.record, 0o755))
	require.NoError(t, os.Mkdir(f.scripts, 0o700))
	require.NoError(t, os.Mkdir(filepath.Join(base, "images"), 0o755))
	writeScript(t, filepath.Join(f.app, "ch-run"), fakeChRun("0.31", help031), 0o755)
	writeScript(t, filepath.Join(f.app, "ch-image"), `
printf '%s\n' "$@" > `+f.record+`/pull-argv
env > `+f.record+`/pull-env
if read line; then echo open > `+f.record+`/stdin; fi
OUTSIDE="$(dirname "$CH_IMAGE_STORAGE")/outside"
make_image() {
	d="$CH_IMAGE_STORAGE/img/`+tinyStored+`"
	mkdir -p "$d/bin" "$d/ch" "$d/etc" "$CH_IMAGE_STORAGE/dlcache"
	printf '#!' > "$d/bin/busybox"; chmod 755 "$d/bin/busybox"
	ln -s /bin/busybox "$d/bin/sh"
	echo 'PATH=/bin' > "$d/ch/environment"
	printf '%s' '`+fatManifest+`' > "$CH_IMAGE_STORAGE/dlcache/`+tinyStored+`.fat.json"
}
`+pullBody+"\n", 0o755)
	writeScript(t, filepath.Join(f.app, "ch-convert"), `
printf '%s\n' "$@" > `+f.record+`/convert-argv
env > `+f.record+`/convert-env
for last; do :; done
echo squash > "$last"
`, 0o755)
	f.r = newRuntime(config.Mechanism{ApplicationPath: f.app, ImageStorageDir: filepath.Join(base, "images")}, hostEnv)
	f.storage = f.r.Storage
	return f
}

func (f *fakeCharliecloud) read(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(f.record, name))
	require.NoError(t, err)
	return string(b)
}

func (f *fakeCharliecloud) request(cred auth.Credential, policy string, log *joblog.Logger) mechanism.PullRequest {
	return mechanism.PullRequest{
		Ref: tinyRef, Policy: policy, Credential: cred, JobKey: "j42-build",
		MountPoints: []string{"/builds/ci", "/scratch/data"}, Dir: f.scripts, Log: log,
	}
}

func TestPullConvertRunRelease(t *testing.T) {
	f := newFake(t, "make_image", map[string]string{"SECRET": "x", "https_proxy": "http://proxy:3128"})
	var logBuf bytes.Buffer
	log := joblog.New(&logBuf)
	ctx := context.Background()

	img, err := f.r.Pull(ctx, f.request(userCredential(t), config.PullAlways, log))
	require.NoError(t, err)

	assert.Equal(t, []string{"--auth", "-s", f.storage, "pull", "127.0.0.1:5443/ci/tiny:latest"},
		strings.Split(strings.TrimSuffix(f.read(t, "pull-argv"), "\n"), "\n"))
	env := strings.Split(f.read(t, "pull-env"), "\n")
	assert.Contains(t, env, "CH_IMAGE_USERNAME=u")
	assert.Contains(t, env, "CH_IMAGE_PASSWORD="+userPassword)
	assert.Contains(t, env, "CH_IMAGE_STORAGE="+f.storage)
	assert.Contains(t, env, "CH_IMAGE_CACHE=disabled")
	assert.Contains(t, env, "https_proxy=http://proxy:3128")
	assert.NotContains(t, env, "SECRET=x")
	assert.NoFileExists(t, filepath.Join(f.record, "stdin"), "ch-image's stdin is closed")

	copyDir := filepath.Join(f.storage, "img", "ci-exec-job+j42-build")
	sum := sha256.Sum256([]byte(fatManifest))
	assert.Equal(t, mechanism.Image{
		Ref: "127.0.0.1:5443/ci/tiny:latest", Handle: "ci-exec-job:j42-build", Format: FormatStorage,
		Digest: "sha256:" + hex.EncodeToString(sum[:]), Shell: "/bin/sh", RunOptions: []string{"--set-env"},
		Private: []string{copyDir}, PullTime: img.PullTime,
	}, img)
	assert.DirExists(t, filepath.Join(copyDir, "builds/ci"))
	assert.DirExists(t, filepath.Join(copyDir, "scratch/data"))
	orig := filepath.Join(f.storage, "img", tinyStored)
	assert.NoDirExists(t, filepath.Join(orig, "builds"), "mount points only in the job's copy")
	assert.Contains(t, logBuf.String(), "ch-image pull 127.0.0.1:5443/ci/tiny:latest")

	conv, err := f.r.Convert(ctx, img, mechanism.ConvertRequest{Dir: f.scripts, Log: log})
	require.NoError(t, err)
	sqfs := filepath.Join(f.scripts, "j42-build.sqfs")
	mnt := filepath.Join(f.scripts, "j42-build.mnt")
	assert.Equal(t, []string{"-i", "ch-image", "-o", "squash", "ci-exec-job:j42-build", sqfs},
		strings.Split(strings.TrimSuffix(f.read(t, "convert-argv"), "\n"), "\n"))
	cenv := strings.Split(f.read(t, "convert-env"), "\n")
	assert.Contains(t, cenv, "CH_IMAGE_STORAGE="+f.storage)
	for _, kv := range cenv {
		assert.False(t, strings.HasPrefix(kv, "CH_IMAGE_PASSWORD="), "no credential for ch-convert")
	}
	assert.Equal(t, FormatSquash, conv.Format)
	assert.Equal(t, sqfs, conv.Handle)
	assert.Equal(t, []string{sqfs, mnt}, conv.Private)
	assert.Equal(t, []string{"--mount=" + mnt, "--set-env"}, conv.RunOptions)
	assert.Equal(t, img.Digest, conv.Digest)
	assert.Equal(t, "/bin/sh", conv.Shell)
	assert.FileExists(t, sqfs)
	assert.DirExists(t, mnt)
	assert.NoDirExists(t, copyDir, "the storage copy is dropped after conversion")
	assert.DirExists(t, orig)

	info, err := f.r.Probe(ctx)
	require.NoError(t, err)
	argv, _, err := f.r.Command(mechanism.RunSpec{
		Info: info, Image: conv, Binds: []mechanism.Bind{mechanism.SamePath("/builds/ci")}, Workdir: "/builds/ci",
		Env: []string{"USER=ciuser"}, Argv: []string{conv.Shell, "/builds/scripts/step_script"},
	})
	require.NoError(t, err)
	assert.Equal(t, []string{filepath.Join(f.app, "ch-run"), "--bind=/builds/ci:/builds/ci", "--cd=/builds/ci",
		"--mount=" + mnt, "--set-env", sqfs, "--", "/bin/sh", "/builds/scripts/step_script"}, argv)

	require.NoError(t, f.r.Release(ctx, conv, f.scripts))
	assert.NoFileExists(t, sqfs)
	assert.NoDirExists(t, mnt)
	assert.DirExists(t, orig)
}

func TestPullPolicies(t *testing.T) {
	t.Run("never, absent", func(t *testing.T) {
		f := newFake(t, "make_image", nil)
		_, err := f.r.Pull(context.Background(), f.request(auth.Credential{}, config.PullNever, joblog.New(&bytes.Buffer{})))
		require.Error(t, err)
		assert.Equal(t, failure.User, failure.ClassOf(err))
		assert.Contains(t, err.Error(), "not in your image storage")
		assert.NoFileExists(t, filepath.Join(f.record, "pull-argv"), "ch-image not run")
	})
	t.Run("if-not-present, present", func(t *testing.T) {
		f := newFake(t, "make_image", nil)
		var buf bytes.Buffer
		_, err := f.r.Pull(context.Background(), f.request(auth.Credential{}, config.PullAlways, joblog.New(&buf)))
		require.NoError(t, err)
		require.NoError(t, os.Remove(filepath.Join(f.record, "pull-argv")))
		img, err := f.r.Pull(context.Background(), f.request(auth.Credential{}, config.PullIfNotPresent, joblog.New(&buf)))
		require.NoError(t, err)
		assert.NoFileExists(t, filepath.Join(f.record, "pull-argv"), "ch-image not run again")
		assert.Contains(t, buf.String(), "already in the storage")
		assert.Equal(t, "ci-exec-job:j42-build", img.Handle)
		assert.Equal(t, "/bin/sh", img.Shell)
	})
}

func TestPullFailures(t *testing.T) {
	tests := []struct {
		name     string
		pullBody string
		cred     func(t *testing.T) auth.Credential
		class    failure.Class
		wantErr  string
	}{
		{"registry refuses user credentials", "echo 'error: no further authentication possible, giving up' >&2; exit 1",
			userCredential, failure.User, "CH_IMAGE_USERNAME/CH_IMAGE_PASSWORD"},
		{"registry refuses job token", "echo 'error: no further authentication possible, giving up' >&2; exit 1",
			jobTokenCredential, failure.System, "job token"},
		{"not found", "echo 'error: unauthorized or not in registry: 127.0.0.1:5443/ci/tiny:latest' >&2; exit 1",
			func(*testing.T) auth.Credential { return auth.Credential{} }, failure.User, "image not found"},
		{"exit 0 without an image", "mkdir -p \"$CH_IMAGE_STORAGE/img\"; exit 0",
			func(*testing.T) auth.Credential { return auth.Credential{} }, failure.System, "not in the storage after the pull"},
		{"image without a shell", "make_image; rm \"$d/bin/sh\" \"$d/bin/busybox\"",
			func(*testing.T) auth.Credential { return auth.Credential{} }, failure.User, "neither bash nor sh"},
		{"mount point through a symlink", "make_image; mkdir -p \"$OUTSIDE\"; ln -s \"$OUTSIDE\" \"$d/scratch\"",
			func(*testing.T) auth.Credential { return auth.Credential{} }, failure.User, "symlink at /scratch"},
		{"mount point blocked by a file", "make_image; touch \"$d/scratch\"",
			func(*testing.T) auth.Credential { return auth.Credential{} }, failure.System, "in the way"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFake(t, tt.pullBody, nil)
			_, err := f.r.Pull(context.Background(), f.request(tt.cred(t), config.PullAlways, joblog.New(&bytes.Buffer{})))
			require.Error(t, err)
			assert.Equal(t, tt.class, failure.ClassOf(err), err.Error())
			assert.Contains(t, err.Error(), tt.wantErr)
			assert.NotContains(t, err.Error(), userPassword)
			assert.NotContains(t, err.Error(), jobToken)
			assert.NoDirExists(t, filepath.Join(f.storage, "img", "ci-exec-job+j42-build"), "no job copy left behind")
			assert.NoDirExists(t, filepath.Join(filepath.Dir(f.storage), "outside", "data"), "nothing created outside the image")
		})
	}
}
