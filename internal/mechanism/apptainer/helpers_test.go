package apptainer

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/imagecache"
	"github.com/ci-exec/ci-exec/internal/job"
	"github.com/ci-exec/ci-exec/internal/mechanism"
)

// The job user and the secrets of these tests. The secrets are checked to
// never appear in argv or error messages.
const (
	jobUser    = "ciuser"
	jobHome    = "/home/ciuser"
	regHost    = "127.0.0.1:5443"
	tinyImage  = regHost + "/ci/tiny:latest"
	alicePass  = "alice-pw-0123456789"
	tokenValue = "glcbt-apptainer-job-token-42"
	jobKey     = "j42-abc"
)

// hostileHostEnv is a driver environment full of things that must never
// reach apptainer or the container (only the proxy is wanted, by pulls).
var hostileHostEnv = map[string]string{
	"APPTAINER_BIND":            "/etc:/mnt",
	"APPTAINER_CACHEDIR":        "/shared/cache",
	"APPTAINER_DOCKER_PASSWORD": "host-password",
	"APPTAINERENV_LD_PRELOAD":   "/evil.so",
	"SINGULARITY_BIND":          "/etc:/mnt",
	"SINGULARITYENV_FOO":        "bar",
	"LD_PRELOAD":                "/evil.so",
	"LD_LIBRARY_PATH":           "/evil",
	"CUSTOM_ENV_CI_JOB_TOKEN":   "custom-env-secret",
	"PATH":                      "/home/runner/shims:/usr/bin",
	"HOME":                      "/root",
	"https_proxy":               "http://proxy:3128",
	"NO_PROXY":                  "localhost",
}

// forbiddenEnvPrefixes are the variable-name prefixes that must not come
// from the host.
var forbiddenEnvPrefixes = []string{"APPTAINER_BIND=", "APPTAINER_DOCKER_PASSWORD=host", "SINGULARITY", "LD_PRELOAD=",
	"LD_LIBRARY_PATH=", "CUSTOM_ENV_", "APPTAINERENV_LD_PRELOAD=/evil.so"}

// runtimeFor is the runtime under test for the job user.
func runtimeFor(cfg config.Mechanism, hostEnv map[string]string) *Runtime {
	return New(cfg, config.UserInfo{Name: jobUser, Home: jobHome}, hostEnv, 2*time.Second)
}

// credentialOf runs the real credential choice for a job and an image on
// reg, and checks that the expected kind came out.
func credentialOf(t *testing.T, j *job.Job, reg string, want auth.Source) auth.Credential {
	t.Helper()
	c, err := auth.Choose(j, reg, credentialVariables)
	require.NoError(t, err)
	require.Equal(t, want, c.Source, c.String())
	return c
}

// aliceFor comes from the user's APPTAINER_DOCKER_* CI/CD variables.
func aliceFor(t *testing.T, reg, password string) auth.Credential {
	return credentialOf(t, &job.Job{Vars: map[string]string{
		"APPTAINER_DOCKER_USERNAME": "alice",
		"APPTAINER_DOCKER_PASSWORD": password,
	}}, reg, auth.UserVariables)
}

func aliceCred(t *testing.T) auth.Credential { return aliceFor(t, regHost, alicePass) }

// tokenFor is the job token, offered because the image is on the job's
// own CI_REGISTRY.
func tokenFor(t *testing.T, reg string) auth.Credential {
	resp := &job.Response{Token: tokenValue, Variables: []job.Variable{{Key: "CI_REGISTRY", Value: reg, Public: true}}}
	return credentialOf(t, &job.Job{Vars: map[string]string{}, Response: resp}, reg, auth.JobToken)
}

func tokenCred(t *testing.T) auth.Credential { return tokenFor(t, regHost) }

// anonymous is no credential at all.
func anonymous(*testing.T) auth.Credential { return auth.Credential{} }

// parsedRef is a validated reference, as Prepare hands it to Pull.
func parsedRef(t *testing.T, s string) mechanism.Ref {
	t.Helper()
	ref, err := mechanism.ParseImage(s)
	require.NoError(t, err)
	return ref
}

// assertNoSecret fails when any string carries one of the test secrets.
func assertNoSecret(t *testing.T, what string, ss ...string) {
	t.Helper()
	for _, s := range ss {
		for _, secret := range []string{alicePass, tokenValue} {
			require.NotContains(t, s, secret, "%s leaks a secret", what)
		}
	}
}

// fakeApptainerScript stands in for apptainer 1.5.3. Its behaviour is set
// by files in the record dir R (version, help, image, pull-fail,
// pull-nowrite, exec-fail) and it records what it was given there. The
// shell probe answers by the words in the SIF: "nosh" (no /bin/sh), "bash".
const fakeApptainerScript = `#!/bin/sh
R=@RECORD@
case "$1" in
version)
	cat "$R/version"
	[ -f "$R/version-fail" ] && exit 1
	exit 0 ;;
exec)
	if [ "$2" = --help ]; then cat "$R/help" || exit 1; exit 0; fi
	echo exec >> "$R/execs"
	printf '%s\n' "$@" > "$R/exec-argv"
	env > "$R/exec-env"
	if [ "$2" != --cleanenv ] || [ "$4" != /bin/sh ] || [ "$5" != -c ]; then
		echo "FATAL:   fake apptainer: unexpected exec $*" >&2; exit 255
	fi
	if [ -f "$R/exec-fail" ]; then cat "$R/exec-fail" >&2; exit 255; fi
	if grep -q nosh "$3"; then
		echo 'FATAL:   stat /bin/sh: no such file or directory' >&2; exit 255
	elif grep -q bash "$3"; then
		echo /bin/bash
	else
		echo /bin/sh
	fi ;;
pull)
	echo pull >> "$R/pulls"
	printf '%s\n' "$@" > "$R/pull-argv"
	env > "$R/pull-env"
	readlink "/proc/$$/fd/0" > "$R/pull-stdin"
	prev=
	for a in "$@"; do out=$prev; prev=$a; done
	[ -f "$R/pull-sleep" ] && sleep "$(cat "$R/pull-sleep")"
	echo 'INFO:    Converting OCI blobs to SIF format'
	if [ -f "$R/pull-fail" ]; then
		printf 'half a SIF' > "$out"
		cat "$R/pull-fail" >&2
		exit 255
	fi
	[ -f "$R/pull-nowrite" ] && exit 0
	cat "$R/image" > "$out"
	echo 'INFO:    Creating SIF file...' ;;
*)
	echo "FATAL:   fake apptainer: unknown command $1" >&2; exit 255 ;;
esac
`

// sifHeaderSize is the size of a SIF global header.
const sifHeaderSize = 128

// sifFile is a file imagecache.ValidSIF accepts: a global header with the
// magic, announcing text as its data, and the text.
func sifFile(text string) []byte {
	b := make([]byte, sifHeaderSize)
	copy(b, "#!/usr/bin/env run-singularity\n")
	copy(b[32:], "SIF_MAGIC")
	binary.LittleEndian.PutUint64(b[112:120], sifHeaderSize)
	binary.LittleEndian.PutUint64(b[120:128], uint64(len(text)))
	return append(b, text...)
}

// sifText is the data of a SIF written by sifFile.
func sifText(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	require.NoError(t, imagecache.ValidSIF(path))
	return string(b[sifHeaderSize:])
}

// helpWithUnderlay is an excerpt of `apptainer exec --help` (1.5.3).
const helpWithUnderlay = `Run a command within a container

Usage:
  apptainer [global options...] exec [exec options...] <container> <command>

Flags:
  -B, --bind strings    a user-bind path specification.
  -e, --cleanenv        clean environment before running container
      --pwd string      initial working directory for payload process inside the container
      --underlay        use underlay instead of overlay
`

// fakeApptainer is an application_path with the fake apptainer in it and
// the runtime that uses it.
type fakeApptainer struct {
	app     string // application_path
	rec     string // behaviour and record files
	jobDir  string // the job's scripts dir
	images  string // image_storage_dir
	storage string
	rt      *Runtime
}

// installFake sets up the fake; cfg may set cache_dir/tmp_dir (the
// application_path and the storage root are filled in).
func installFake(t *testing.T, cfg config.Mechanism, hostEnv map[string]string) *fakeApptainer {
	t.Helper()
	root := t.TempDir()
	f := &fakeApptainer{
		app:    filepath.Join(root, "bin"),
		rec:    filepath.Join(root, "rec"),
		jobDir: filepath.Join(root, "job"),
		images: filepath.Join(root, "images"),
	}
	for _, d := range []string{f.app, f.rec, f.jobDir, f.images} {
		require.NoError(t, os.Mkdir(d, 0o755))
	}
	script := strings.ReplaceAll(fakeApptainerScript, "@RECORD@", "'"+f.rec+"'")
	require.NoError(t, os.WriteFile(filepath.Join(f.app, "apptainer"), []byte(script), 0o755))
	f.set(t, "version", "apptainer version 1.5.3\n")
	f.set(t, "help", helpWithUnderlay)
	f.setImage(t, "SIF image with bash\n")
	cfg.ApplicationPath = f.app
	cfg.ImageStorageDir = f.images
	f.rt = runtimeFor(cfg, hostEnv)
	f.storage = f.rt.Storage
	return f
}

// set writes a behaviour file.
func (f *fakeApptainer) set(t *testing.T, name, content string) {
	t.Helper()
	require.NoError(t, os.WriteFile(filepath.Join(f.rec, name), []byte(content), 0o644))
}

// setImage makes the SIF the fake pulls hold text.
func (f *fakeApptainer) setImage(t *testing.T, text string) {
	t.Helper()
	f.set(t, "image", string(sifFile(text)))
}

// unset removes a behaviour or record file.
func (f *fakeApptainer) unset(t *testing.T, name string) {
	t.Helper()
	require.NoError(t, os.RemoveAll(filepath.Join(f.rec, name)))
}

// lines reads a record file as lines.
func (f *fakeApptainer) lines(t *testing.T, name string) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(f.rec, name))
	require.NoError(t, err)
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

// count is how many lines a record file has (0 when missing).
func (f *fakeApptainer) count(t *testing.T, name string) int {
	t.Helper()
	if _, err := os.Stat(filepath.Join(f.rec, name)); os.IsNotExist(err) {
		return 0
	}
	return len(f.lines(t, name))
}

// pulls is how often apptainer pull ran.
func (f *fakeApptainer) pulls(t *testing.T) int { return f.count(t, "pulls") }

// execs is how often the image was run (the shell probe).
func (f *fakeApptainer) execs(t *testing.T) int { return f.count(t, "execs") }

// recordedEnv is a recorded environment without what the shell itself adds.
func (f *fakeApptainer) recordedEnv(t *testing.T, name string) []string {
	t.Helper()
	var env []string
	for _, kv := range f.lines(t, name) {
		k, _, _ := strings.Cut(kv, "=")
		if k == "PWD" || k == "OLDPWD" || k == "SHLVL" || k == "_" {
			continue
		}
		env = append(env, kv)
	}
	return env
}

// storeRoot is the user's store of images for Apptainer.
func (f *fakeApptainer) storeRoot() string {
	return filepath.Join(f.images, jobUser+".ci-exec", "apptainer")
}

// store opens the user's store as the runtime does.
func (f *fakeApptainer) store(t *testing.T) *imagecache.Store {
	t.Helper()
	st, err := f.rt.Store()
	require.NoError(t, err)
	require.Equal(t, f.storeRoot(), st.Root)
	return st
}

// sifKey is the store key of an image: its manifest digest.
func sifKey(digest string) string { return strings.Replace(digest, ":", "-", 1) + ".sif" }

// storedSIF is the path of an image in the user's store.
func (f *fakeApptainer) storedSIF(digest string) string {
	return filepath.Join(f.storeRoot(), "entries", sifKey(digest))
}

// lease is where a job's lease on an image is.
func (f *fakeApptainer) lease(digest, key string) string {
	return filepath.Join(f.storeRoot(), "refs", sifKey(digest), key)
}

// tagRecord is the store's record of the digest of ref's last pull
// (imagecache's layout).
func (f *fakeApptainer) tagRecord(ref mechanism.Ref) string {
	return filepath.Join(f.storeRoot(), "tags", strings.NewReplacer("/", "%", ":", "+", "@", "=").Replace(ref.Full))
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

// entries are the store's published images (without their .meta files).
func (f *fakeApptainer) entries(t *testing.T) []string {
	t.Helper()
	var out []string
	for _, n := range ls(t, filepath.Join(f.storeRoot(), "entries")) {
		if !strings.HasSuffix(n, ".meta") {
			out = append(out, n)
		}
	}
	return out
}
