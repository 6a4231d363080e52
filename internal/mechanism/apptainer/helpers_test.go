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
	"github.com/ci-exec/ci-exec/internal/mechanism/mechtest"
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

// creds are chosen from alice's APPTAINER_DOCKER_* CI/CD variables or
// the job token; secrets must never leak.
var (
	creds   = mechtest.Creds{Names: credentialVariables, User: "alice"}
	secrets = mechtest.Secrets{alicePass, tokenValue}
)

func aliceCred(t *testing.T) auth.Credential { return creds.FromUser(t, regHost, alicePass) }

// tokenCred is the job token, offered because the image is on the job's
// own CI_REGISTRY.
func tokenCred(t *testing.T) auth.Credential { return creds.JobToken(t, regHost, tokenValue) }

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
	[ -p "$R/pull-gate" ] && read gate < "$R/pull-gate"
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
	*mechtest.Fake
	rt *Runtime
}

// installFake sets up the fake; cfg may set cache_dir/tmp_dir (the
// application_path and the storage root are filled in).
func installFake(t *testing.T, cfg config.Mechanism, hostEnv map[string]string) *fakeApptainer {
	t.Helper()
	f := &fakeApptainer{Fake: mechtest.NewFake(t, Name, jobUser, []string{"/builds/ci"})}
	f.Install(t, "apptainer", fakeApptainerScript)
	f.Set(t, "version", "apptainer version 1.5.3\n")
	f.Set(t, "help", helpWithUnderlay)
	f.setImage(t, "SIF image with bash\n")
	f.rt = runtimeFor(f.Config(cfg), hostEnv)
	f.Attach(f.rt, f.rt.Storage)
	return f
}

// setImage makes the SIF the fake pulls hold text.
func (f *fakeApptainer) setImage(t *testing.T, text string) {
	t.Helper()
	f.Set(t, "image", string(sifFile(text)))
}

// execs is how often the image was run (the shell probe).
func (f *fakeApptainer) execs(t *testing.T) int { return f.Count(t, "execs") }

// sifKey is the store key of an image: its manifest digest.
func sifKey(digest string) string { return strings.Replace(digest, ":", "-", 1) + ".sif" }

// storedSIF is the path of an image in the user's store.
func (f *fakeApptainer) storedSIF(digest string) string {
	return filepath.Join(f.StoreRoot(), "entries", sifKey(digest))
}

// lease is where a job's lease on an image is.
func (f *fakeApptainer) lease(digest, key string) string {
	return filepath.Join(f.StoreRoot(), "refs", sifKey(digest), key)
}
