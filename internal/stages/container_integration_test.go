package stages_test

// Integration tests of the container run mechanisms: the built ci-exec,
// driven by the runner double, runs real ch-run (and apptainer) against the
// local TLS registries that scripts/test-env.sh starts, as root and as the
// unprivileged test user. The same tests run for every mechanism.

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/mechanism/podman"
	"github.com/ci-exec/ci-exec/internal/mechanism/template"
	"github.com/ci-exec/ci-exec/internal/runnerdouble"
	"github.com/ci-exec/ci-exec/internal/testenv"
)

// runtimeFixture is what differs between mechanisms in these tests.
type runtimeFixture struct {
	// services: the runtime runs a job's services: (Podman does not yet).
	services bool
	// name is the run_mechanism value and the config table name.
	name string
	// program must be installed for the mechanism to work.
	program string
	// argsVar is the user-args variable; userVar/passVar the credential
	// variables.
	argsVar, userVar, passVar string
	// table are extra lines every test config puts in [general.<name>].
	table string
	// deniedArgs are user args the default allowlist refuses; allowedEnvArg
	// sets CI_EXEC_ARG_TEST=from-user-args in the container.
	deniedArgs    []string
	allowedEnvArg string
	// failingArg is an allowed user arg with which the runtime itself fails.
	failingArg string
	// readOnlyBinds: the runtime can bind read-only (else ":ro" is refused).
	readOnlyBinds bool
	// convertLog is what prepare logs when asked to convert the image.
	convertLog string
	// plainHTTP: the runtime can pull from a plain-HTTP registry the admin
	// lists in insecure_registries.
	plainHTTP bool
	// pullSection starts the job-log section of one pull; buildLine is a
	// line the runtime prints while building a store entry.
	pullSection, buildLine string
	// mech is the run_mechanism value (default name, which names the
	// subtests); header starts the runtime's table (default
	// [general.<name>]).
	mech, header string
	// podmanSuffix names the user's Podman storage (<user><suffix>) of a
	// mechanism that runs Podman; podmanRunDir is its run dir.
	podmanSuffix string
	podmanRunDir func(storage string, uid int) string
}

// tableHeader is the line that starts the runtime's table.
func (rt runtimeFixture) tableHeader() string {
	if rt.header != "" {
		return rt.header
	}
	return "[general." + rt.name + "]"
}

// mechanism is the run_mechanism value.
func (rt runtimeFixture) mechanism() string {
	if rt.mech != "" {
		return rt.mech
	}
	return rt.name
}

// storeName is the runtime's dir in the user's image store.
func (rt runtimeFixture) storeName() string { return strings.ReplaceAll(rt.mechanism(), ":", "-") }

var charliecloudFixture = runtimeFixture{
	name:          "charliecloud",
	program:       "ch-run",
	argsVar:       "JACAMAR_CI_CHARLIECLOUD_ARGS",
	userVar:       "CH_IMAGE_USERNAME",
	passVar:       "CH_IMAGE_PASSWORD",
	deniedArgs:    []string{"-b /etc:/mnt/0", "--bind=/:/mnt/1", "--uid=0", "-w", "--storage=/tmp", "--write-fake", "--join", "-u0"},
	allowedEnvArg: "--set-env=CI_EXEC_ARG_TEST=from-user-args",
	failingArg:    "--cd=/no/such/dir",
	convertLog:    `squashfs, cache miss, pulled in [0-9.]+s, converted in [0-9.]+s`,
	pullSection:   "ch-image pull ",
	buildLine:     "input:   dir",
	services:      true,
}

var apptainerFixture = runtimeFixture{
	name:    "apptainer",
	program: "apptainer",
	argsVar: "JACAMAR_CI_APPTAINER_ARGS",
	userVar: "APPTAINER_DOCKER_USERNAME",
	passVar: "APPTAINER_DOCKER_PASSWORD",
	table:   `application_path = "/opt/apptainer/bin"`,
	deniedArgs: []string{"-B /etc:/mnt/0", "--bind=/:/mnt/1", "--fakeroot", "-w", "--add-caps=CAP_SYS_ADMIN",
		"--overlay=/tmp", "--home=/root", "--docker-login", "-f", "--mount=type=bind,src=/etc,dst=/x"},
	allowedEnvArg: "--env=CI_EXEC_ARG_TEST=from-user-args",
	failingArg:    "--pwd=/no/such/dir",
	readOnlyBinds: true,
	convertLog:    `sif, cache miss, pulled in [0-9.]+s, ready in`,
	plainHTTP:     true,
	pullSection:   "apptainer pull ",
	buildLine:     "INFO:    Starting build...",
	services:      true,
}

var podmanFixture = runtimeFixture{
	name:    "podman",
	program: "podman",
	argsVar: "JACAMAR_CI_PODMAN_ARGS",
	userVar: "PODMAN_REGISTRY_USERNAME",
	passVar: "PODMAN_REGISTRY_PASSWORD",
	deniedArgs: []string{"-v /etc:/mnt/0", "--volume=/:/mnt/1", "--privileged", "--mount=type=bind,src=/etc,dst=/x",
		"--device=/dev/fuse", "--cap-add=SYS_ADMIN", "--security-opt=seccomp=unconfined", "--userns=host", "--pid=host",
		"--network=none", "--env-host", "--env-file=/etc/passwd", "-u0", "--rootfs", "--entrypoint=/bin/sh"},
	allowedEnvArg: "--env=CI_EXEC_ARG_TEST=from-user-args",
	failingArg:    "--ulimit=nofile=bogus",
	readOnlyBinds: true,
	convertLog:    `podman, cache miss, pulled in [0-9.]+s, ready in`,
	plainHTTP:     true,
	pullSection:   "podman pull ",
	buildLine:     "Copying blob ",
	podmanSuffix:  ".podman",
	podmanRunDir:  podman.RunDir,
}

// podmanTemplateFixture is the shipped Podman template
// (configs/templates/podman.toml), which mirrors the built-in: the same
// tests, the same expectations.
var podmanTemplateFixture = func() runtimeFixture {
	rt := podmanFixture
	rt.name, rt.mech, rt.header = "podman-template", "template:podman", "[runtimes.podman]"
	b, err := os.ReadFile(filepath.Join("..", "..", "configs", "templates", "podman.toml"))
	if err != nil {
		panic(err)
	}
	_, rt.table, _ = strings.Cut(string(b), rt.header+"\n")
	rt.convertLog = `template-ref, cache miss, pulled in [0-9.]+s, ready in`
	rt.pullSection = "template:podman pull "
	rt.podmanSuffix, rt.podmanRunDir = ".tpl-podman", template.RunDir
	return rt
}()

// runtimes are the mechanisms under test.
func runtimes(t *testing.T) []runtimeFixture {
	t.Helper()
	return []runtimeFixture{charliecloudFixture, apptainerFixture, podmanFixture, podmanTemplateFixture}
}

// forEachRuntimeAndUser runs f for every mechanism (that passes the
// optional filters) as root and as the unprivileged test user.
func forEachRuntimeAndUser(t *testing.T, f func(t *testing.T, rt runtimeFixture, u testenv.User), only ...func(runtimeFixture) bool) {
	for _, rt := range runtimes(t) {
		if len(only) > 0 && !only[0](rt) {
			continue
		}
		for _, u := range testenv.Users(t) {
			t.Run(rt.name+"/"+u.Name, func(t *testing.T) {
				testenv.RequireBinary(t, rt.program)
				f(t, rt, u)
			})
		}
	}
}

// forEachRuntime runs f for every mechanism as the unprivileged test user
// (for policy checks that do not depend on the user).
func forEachRuntime(t *testing.T, f func(t *testing.T, rt runtimeFixture, u testenv.User), only ...func(runtimeFixture) bool) {
	for _, rt := range runtimes(t) {
		if len(only) > 0 && !only[0](rt) {
			continue
		}
		t.Run(rt.name, func(t *testing.T) {
			testenv.RequireBinary(t, rt.program)
			f(t, rt, testenv.Unprivileged(t))
		})
	}
}

// ctEnv is one test's runner and directories.
type ctEnv struct {
	runner  runnerdouble.Config
	dir     string // private test dir, owned by the user
	data    string // the user's data dir
	storage string // image_storage_dir
}

// containerRunner writes a config with the mechanism enabled (general and
// table are extra lines for [general] and [general.<mechanism>]) and returns
// a runner double that runs ci-exec as u.
func containerRunner(t *testing.T, rt runtimeFixture, u testenv.User, general, table string) ctEnv {
	t.Helper()
	return containerRunnerIn(t, rt, u, general, table, "storage")
}

// containerRunnerIn is containerRunner with image_storage_dir at
// storageRel in the test dir ("data/<user>" puts it in the data dir, as
// batch executors keep it by default).
func containerRunnerIn(t *testing.T, rt runtimeFixture, u testenv.User, general, table, storageRel string) ctEnv {
	t.Helper()
	dir := testenv.PrivateDir(t, u)
	storage := filepath.Join(dir, storageRel)
	require.NoError(t, os.MkdirAll(filepath.Dir(storage), 0o755))
	require.NoError(t, os.Mkdir(storage, 0o755))
	require.NoError(t, os.Chown(storage, u.UID, u.GID))
	data := filepath.Join(dir, "data")
	cfg := fmt.Sprintf("[general]\ndata_dir = %q\nrun_mechanism = %q\nkill_timeout = \"5s\"\n%s\n%s\nimage_storage_dir = %q\n%s\n%s\n",
		data+"/$USER", rt.mechanism(), general, rt.tableHeader(), storage, rt.table, table)
	if rt.podmanSuffix != "" {
		// Podman's run root for this storage lives in /tmp (see
		// podman.RunDir). A test that SIGKILLs ci-exec leaves the rootless
		// pause process (in a session of its own) behind; the next job of
		// the same storage would reuse it, but this storage has none.
		t.Cleanup(func() {
			run := rt.podmanRunDir(filepath.Join(storage, u.Name+rt.podmanSuffix), u.UID)
			pid := filepath.Join(run, "xdg", "libpod", "tmp", "pause.pid")
			if rt.header != "" {
				pid = filepath.Join(run, "libpod", "tmp", "pause.pid") // the template's XDG_RUNTIME_DIR is the run dir
			}
			if b, err := os.ReadFile(pid); err == nil {
				pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
				comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
				if err == nil && pid > 1 && strings.TrimSpace(string(comm)) == "catatonit" {
					_ = syscall.Kill(pid, syscall.SIGKILL)
				}
			}
			testenv.RemoveAll(run)
		})
	}
	path := testenv.WriteConfig(t, dir, cfg)
	t.Logf("config:\n%s", cfg)
	runner := runnerConfig(t, u, path, dir)
	// The runner's own environment has runtime settings that must reach
	// neither the runtime nor the container.
	runner.BaseEnv = append(runner.BaseEnv, "APPTAINERENV_CI_EXEC_LEAK=leaked", "SINGULARITYENV_CI_EXEC_LEAK2=leaked",
		"APPTAINER_BIND=/etc:/hostetc", "SINGULARITY_BIND=/etc:/hostetc2", "LD_PRELOAD=/nonexistent/ci-exec-leak.so",
		"CH_RUN_ARGS=--bind=/etc:/hostetc")
	return ctEnv{runner: runner, dir: dir, data: filepath.Join(data, u.Name), storage: storage}
}

// tokenJob is a job whose image lives in the registry that wants the job
// token, with the trusted payload naming that registry as CI_REGISTRY.
func tokenJob(t *testing.T, image string) runnerdouble.Job {
	t.Helper()
	return runnerdouble.Job{
		Image:    image,
		Registry: testenv.Fact(t, "CI_EXEC_TEST_REGISTRY"),
		Token:    testenv.ReadSecretFile(t, "CI_EXEC_TEST_TOKEN_FILE"),
	}
}

func assertUserFailure(t *testing.T, res *runnerdouble.Result, want ...string) {
	t.Helper()
	assert.Equal(t, runnerdouble.StateFailed, res.State)
	assert.Equal(t, runnerdouble.ReasonScriptFailure, res.FailureReason, "a user's mistake is a build failure")
	for _, w := range want {
		assert.Contains(t, res.Log, w)
	}
}

// assertRefusedBeforePull checks that a job was refused in prepare without
// running any stage or contacting a registry.
func assertRefusedBeforePull(t *testing.T, res *runnerdouble.Result, want ...string) {
	t.Helper()
	assertUserFailure(t, res, want...)
	assert.Empty(t, res.RunStages(), "no stage may run")
	assert.NotContains(t, res.Log, "Pulling ", "nothing may be pulled")
	assert.Len(t, res.Calls(runnerdouble.KindPrepare), 1, "a user error is not retried")
}

func TestContainerJobRunsInImage(t *testing.T) {
	forEachRuntimeAndUser(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		e := containerRunner(t, rt, u, "retain_logs = true", `image_allowlist = ['127\.0\.0\.1:5443/ci/.*']`)
		j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
		j.Variables = map[string]string{"GREETING": "hello from the job"}
		j.Script = []string{
			`grep '^ID=' /etc/os-release`,
			`echo "pwd=$PWD"`,
			`echo "greeting=$GREETING"`,
			`echo "uid=$(id -u)"`,
			`echo "runner secret=[${RUNNER_SERVICE_SECRET:-unset}] custom=[${CUSTOM_ENV_CI_JOB_TOKEN:-unset}]"`,
			`echo "leak=[${CI_EXEC_LEAK:-}${CI_EXEC_LEAK2:-}${LD_PRELOAD:-}${CH_RUN_ARGS:-}]"`,
			`ls -d /hostetc /hostetc2 2>/dev/null || echo "no host binds"`,
			`echo made-in-container > made.txt`,
			`echo cached > "$CI_PROJECT_DIR/../../../../cache-probe.txt" || true`,
		}
		j.AfterScript = []string{`grep '^ID=' /etc/os-release | sed 's/^/after: /'`}
		watch := testenv.WatchCmdlines(j.Token)
		res := runJob(t, e.runner, j)
		hits := watch()

		require.True(t, res.Succeeded(), res.Error)
		assert.Contains(t, res.Log, "ID=citiny")
		assert.Contains(t, res.Log, "after: ID=citiny", "after_script runs in the job's image")
		assert.Contains(t, res.Log, "pwd="+res.ProjectDir+"\n", "the project dir is bound at the same path")
		assert.Contains(t, res.Log, "greeting=hello from the job")
		assert.Contains(t, res.Log, fmt.Sprintf("uid=%d\n", u.UID))
		assert.Contains(t, res.Log, "runner secret=[unset] custom=[unset]", "the runner's environment must not reach the container")
		assert.Contains(t, res.Log, "leak=[]", "runtime settings of the runner's environment must not reach the container")
		assert.Contains(t, res.Log, "no host binds")
		assert.NotContains(t, res.Log, "ci-exec-leak.so")
		assert.Contains(t, res.Log, "credentials: job token", "the image in CI_REGISTRY is pulled with the job token")
		assert.Contains(t, res.Log, "digest sha256:")

		fi, err := os.Stat(filepath.Join(res.ProjectDir, "made.txt"))
		require.NoError(t, err)
		assert.Equal(t, uint32(u.UID), fi.Sys().(*syscall.Stat_t).Uid, "files written in the container belong to the job user on the host")

		// The job token never appears in a command line or a log, and
		// files that hold it (the runner's scripts) are private.
		assert.Empty(t, hits, "the job token appeared in a command line")
		assert.NotContains(t, res.RawLog, j.Token)
		assert.NotContains(t, res.RunnerLog, j.Token)
		assertSecretFilesPrivate(t, []string{e.data, e.storage}, j.Token)
	})
}

// assertSecretFilesPrivate walks roots and fails for any file that contains
// secret and that another user could read.
func assertSecretFilesPrivate(t *testing.T, roots []string, secret string) {
	t.Helper()
	for _, root := range roots {
		_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil || !d.Type().IsRegular() {
				return nil
			}
			b, err := os.ReadFile(p)
			if err != nil || !bytes.Contains(b, []byte(secret)) {
				return nil
			}
			for q := p; strings.HasPrefix(q, root); q = filepath.Dir(q) {
				fi, err := os.Stat(q)
				require.NoError(t, err)
				if fi.Mode().Perm()&0o005 == 0 && fi.Mode().Perm()&0o050 == 0 {
					return nil // this file or a parent dir shuts others out
				}
			}
			t.Errorf("%s holds the secret and others can read it", p)
			return nil
		})
	}
}

func TestContainerExitCodes(t *testing.T) {
	forEachRuntimeAndUser(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		e := containerRunner(t, rt, u, "", `pull_policy = "if-not-present"`)
		for _, c := range []struct {
			name   string
			script string
			code   int
		}{
			{"exit 0", "exit 0", 0},
			{"exit 3", "exit 3", 3},
			{"SIGKILL", "kill -9 $$", 137},
			{"exit 137", "exit 137", 137},
		} {
			t.Run(c.name, func(t *testing.T) {
				j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
				j.Script = []string{"echo in-container", c.script}
				j.AfterScript = []string{`echo "after status=$CI_JOB_STATUS"`}
				res := runJob(t, e.runner, j)
				assert.Contains(t, res.Log, "in-container")
				if c.code == 0 {
					assert.True(t, res.Succeeded(), res.Error)
					assert.Contains(t, res.Log, "after status=success")
					return
				}
				assert.Equal(t, runnerdouble.ReasonScriptFailure, res.FailureReason)
				assert.Equal(t, c.code, res.ExitCode)
				assert.Contains(t, res.Log, "after status=failed")
			})
		}
	})
}

func TestContainerImageWithBash(t *testing.T) {
	forEachRuntimeAndUser(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		e := containerRunner(t, rt, u, "", "")
		j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE_BASH"))
		j.Script = []string{`grep '^ID=' /etc/os-release`, `echo "bash=${BASH_VERSION:+yes}"`}
		res := runJob(t, e.runner, j)
		require.True(t, res.Succeeded(), res.Error)
		assert.Contains(t, res.Log, "ID=citinybash")
		assert.Contains(t, res.Log, "bash=yes", "stage scripts run with the image's bash when it has one")
		assert.NotContains(t, res.Log, "has no bash")
	})
}

func TestContainerAllowlistRefusesBypasses(t *testing.T) {
	forEachRuntimeAndUser(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		e := containerRunner(t, rt, u, "", `image_allowlist = ['127\.0\.0\.1:5443/ci/tiny:latest']`)
		digest := "sha256:" + strings.Repeat("ab", 32)
		for name, image := range map[string]string{
			"other port":       "127.0.0.1:5444/ci/tiny:latest",
			"tag suffix":       "127.0.0.1:5443/ci/tiny:latestx",
			"host prefix":      "x127.0.0.1:5443/ci/tiny:latest",
			"host suffix":      "127.0.0.1.nip.io:5443/ci/tiny:latest",
			"path suffix":      "127.0.0.1:5443/ci/tiny/evil:latest",
			"path prefix":      "127.0.0.1:5443/evil/ci/tiny:latest",
			"dot dot":          "127.0.0.1:5443/ci/../pub/tiny:latest",
			"uppercase":        "127.0.0.1:5443/CI/tiny:latest",
			"digest":           "127.0.0.1:5443/ci/tiny@" + digest,
			"tag and digest":   "127.0.0.1:5443/ci/tiny:latest@" + digest,
			"docker hub":       "ci/tiny:latest",
			"newline":          "127.0.0.1:5443/ci/tiny:latest\nevil.example/x",
			"scheme":           "https://127.0.0.1:5443/ci/tiny:latest",
			"trailing garbage": "127.0.0.1:5443/ci/tiny:latest/",
		} {
			t.Run(name, func(t *testing.T) {
				res := runJob(t, e.runner, runnerdouble.Job{Image: image, Script: []string{"echo must-not-run"}})
				assertRefusedBeforePull(t, res)
				assert.NotContains(t, res.Log, "must-not-run")
				assert.Regexp(t, `not allowed on this runner|not a valid image reference`, res.Log)
			})
		}
		t.Run("allowed", func(t *testing.T) {
			j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
			j.Script = []string{"echo allowed-ran"}
			res := runJob(t, e.runner, j)
			require.True(t, res.Succeeded(), res.Error)
			assert.Contains(t, res.Log, "allowed-ran")
		})
	})
}

func TestContainerImageNamesNeverReachAShell(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		e := containerRunner(t, rt, u, "", "")
		marker := filepath.Join(e.dir, "pwned")
		for name, image := range map[string]string{
			"semicolon":     "127.0.0.1:5443/ci/tiny:latest;touch " + marker,
			"command subst": "$(touch " + marker + ")",
			"backticks":     "127.0.0.1:5443/ci/`touch " + marker + "`",
			"single quotes": "'127.0.0.1:5443/ci/tiny:latest' ; touch " + marker,
			"double quotes": `"127.0.0.1:5443/ci/tiny:latest"`,
			"space":         "127.0.0.1:5443/ci/tiny:latest --help",
			"option":        "--help",
			"pipe":          "127.0.0.1:5443/ci/tiny:latest|touch " + marker,
		} {
			t.Run(name, func(t *testing.T) {
				res := runJob(t, e.runner, runnerdouble.Job{Image: image, Script: []string{"echo must-not-run"}})
				assertRefusedBeforePull(t, res, "is not a valid image reference")
				_, err := os.Stat(marker)
				assert.ErrorIs(t, err, os.ErrNotExist, "the image name reached a shell")
			})
		}
	})
}

func TestContainerUserVolumes(t *testing.T) {
	forEachRuntimeAndUser(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		base := testenv.PrivateDir(t, u)
		allowed := filepath.Join(base, "allowed")
		outside := filepath.Join(base, "outside")
		for _, d := range []string{filepath.Join(allowed, "data"), outside} {
			require.NoError(t, os.MkdirAll(d, 0o755))
		}
		require.NoError(t, os.WriteFile(filepath.Join(allowed, "data", "file.txt"), []byte("volume-data\n"), 0o644))
		require.NoError(t, os.WriteFile(filepath.Join(outside, "secret.txt"), []byte("outside-data\n"), 0o644))
		require.NoError(t, os.Symlink(outside, filepath.Join(allowed, "link")))
		testenv.Chown(t, base, u)
		e := containerRunner(t, rt, u, "", fmt.Sprintf("user_volume_variable = \"CI_VOLUMES\"\nvolume_prefixes = [%q]\npull_policy = \"if-not-present\"", allowed))

		t.Run("allowed", func(t *testing.T) {
			j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
			j.Variables = map[string]string{
				"CI_VOLUMES_0": filepath.Join(allowed, "data") + ":/data",
				"CI_VOLUMES_1": filepath.Join(allowed, "data"),
			}
			j.Script = []string{"cat /data/file.txt", "cat " + filepath.Join(allowed, "data", "file.txt"), "echo from-job > /data/new.txt"}
			res := runJob(t, e.runner, j)
			require.True(t, res.Succeeded(), res.Error)
			assert.Equal(t, 2, strings.Count(res.Log, "volume-data\n"))
			fi, err := os.Stat(filepath.Join(allowed, "data", "new.txt"))
			require.NoError(t, err)
			assert.Equal(t, uint32(u.UID), fi.Sys().(*syscall.Stat_t).Uid)
		})
		t.Run("read-only", func(t *testing.T) {
			j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
			j.Variables = map[string]string{"CI_VOLUMES_0": filepath.Join(allowed, "data") + ":/data:ro"}
			j.Script = []string{"cat /data/file.txt", "if echo x > /data/ro-write.txt; then echo WRITABLE; else echo read-only-ok; fi"}
			res := runJob(t, e.runner, j)
			if !rt.readOnlyBinds {
				assertRefusedBeforePull(t, res, "cannot mount volumes read-only")
				return
			}
			require.True(t, res.Succeeded(), res.Error)
			assert.Contains(t, res.Log, "volume-data")
			assert.Contains(t, res.Log, "read-only-ok")
			assert.NoFileExists(t, filepath.Join(allowed, "data", "ro-write.txt"))
		})
		for name, vol := range map[string]string{
			"outside the prefixes": outside + ":/data",
			"through a symlink":    filepath.Join(allowed, "link") + ":/data",
			"dot dot":              filepath.Join(allowed) + "/../outside:/data",
			"the prefix's parent":  base + ":/data",
			"relative":             "allowed/data:/data",
			"missing":              filepath.Join(allowed, "nope") + ":/data",
			"onto /proc":           filepath.Join(allowed, "data") + ":/proc/x",
		} {
			t.Run(name, func(t *testing.T) {
				j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
				j.Variables = map[string]string{"CI_VOLUMES_0": vol}
				j.Script = []string{"cat /data/secret.txt"}
				res := runJob(t, e.runner, j)
				assertRefusedBeforePull(t, res, "CI_VOLUMES_0")
				assert.NotContains(t, res.Log, "outside-data")
			})
		}
	})
}

func TestContainerUserArgs(t *testing.T) {
	forEachRuntimeAndUser(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		e := containerRunner(t, rt, u, "", `pull_policy = "if-not-present"`)
		t.Run("allowed", func(t *testing.T) {
			j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
			j.Variables = map[string]string{rt.argsVar: rt.allowedEnvArg}
			j.Script = []string{`echo "arg=$CI_EXEC_ARG_TEST"`}
			res := runJob(t, e.runner, j)
			require.True(t, res.Succeeded(), res.Error)
			assert.Contains(t, res.Log, "arg=from-user-args")
		})
		t.Run("runtime fails on them", func(t *testing.T) {
			j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
			j.Variables = map[string]string{rt.argsVar: rt.failingArg}
			j.Script = []string{"echo must-not-run"}
			res := runJob(t, e.runner, j)
			assertUserFailure(t, res, "could not run the build_script stage", "check the arguments in "+rt.argsVar)
		})
		for _, args := range rt.deniedArgs {
			t.Run(args, func(t *testing.T) {
				j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
				j.Variables = map[string]string{rt.argsVar: args}
				j.Script = []string{"echo must-not-run"}
				res := runJob(t, e.runner, j)
				assertRefusedBeforePull(t, res, rt.argsVar)
				assert.NotContains(t, res.Log, "\nmust-not-run")
			})
		}
	})
	forEachRuntime(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		e := containerRunner(t, rt, u, "", "disable_user_args = true\npull_policy = \"if-not-present\"")
		j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
		j.Variables = map[string]string{rt.argsVar: rt.deniedArgs[0] + " " + rt.allowedEnvArg}
		j.Script = []string{`echo "arg=[${CI_EXEC_ARG_TEST:-}]"`}
		res := runJob(t, e.runner, j)
		require.True(t, res.Succeeded(), res.Error)
		assert.Contains(t, res.Log, "arg=[]", "disable_user_args ignores the variable")
		assert.Contains(t, res.Log, rt.argsVar+" is ignored")
	})
}

// TestContainerWriteFlagLeavesTheStoredImage: with ch-run -w allowed, a
// job that writes into its image changes its own copy only: the image in
// the user's storage, which the next job copies, stays as pulled (a copy
// made of hard links would share the written file with it).
func TestContainerWriteFlagLeavesTheStoredImage(t *testing.T) {
	forEachRuntimeAndUser(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		e := containerRunner(t, rt, u, "", `allowed_user_args = ["-w", "--set-env"]`)
		j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
		j.Variables = map[string]string{rt.argsVar: "-w"}
		j.Script = []string{`echo job-was-here >> /etc/os-release`, `echo "written=$(grep -c job-was-here /etc/os-release)"`}
		res := runJob(t, e.runner, j)
		require.True(t, res.Succeeded(), res.Error)
		assert.Contains(t, res.Log, "written=1", "the job wrote into its image")
		assert.Contains(t, res.Log, "Copying the image for this job")

		stored, err := filepath.Glob(filepath.Join(e.storage, u.Name+".ch", "img", "*%ci%tiny@sha256+*", "etc", "os-release"))
		require.NoError(t, err)
		require.Len(t, stored, 1, "the pulled image in the user's storage")
		b, err := os.ReadFile(stored[0])
		require.NoError(t, err)
		assert.NotContains(t, string(b), "job-was-here", "the stored image is unchanged")
		left, err := os.ReadDir(filepath.Join(e.storage, u.Name+".ci-exec", "charliecloud-jobs"))
		require.NoError(t, err)
		assert.Empty(t, left, "cleanup removed the job's copy")

		j.Script = []string{`echo "next=$(grep -c job-was-here /etc/os-release)"`}
		j.Variables = nil
		res = runJob(t, e.runner, j)
		require.True(t, res.Succeeded(), res.Error)
		assert.Contains(t, res.Log, "next=0", "the next job runs the image as pulled")
	}, func(rt runtimeFixture) bool { return rt.name == "charliecloud" })
}

func TestContainerRegistryCredentials(t *testing.T) {
	forEachRuntimeAndUser(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		e := containerRunner(t, rt, u, "", "")
		image := testenv.Fact(t, "CI_EXEC_TEST_IMAGE")
		userPass := testenv.ReadSecretFile(t, "CI_EXEC_TEST_USER_PASSWORD_FILE")
		regUser := testenv.Fact(t, "CI_EXEC_TEST_REGISTRY_USER2")

		t.Run("user variables", func(t *testing.T) {
			j := runnerdouble.Job{Image: image, Variables: map[string]string{rt.userVar: regUser, rt.passVar: userPass}, Script: []string{"echo pulled-with-user-creds"}}
			watch := testenv.WatchCmdlines(userPass)
			res := runJob(t, e.runner, j)
			assert.Empty(t, watch(), "the password appeared in a command line")
			require.True(t, res.Succeeded(), res.Error)
			assert.Contains(t, res.Log, "pulled-with-user-creds")
			assert.Contains(t, res.Log, "credentials: user variables")
			assert.NotContains(t, res.RawLog, userPass)
		})
		t.Run("wrong user password", func(t *testing.T) {
			j := runnerdouble.Job{Image: image, Variables: map[string]string{rt.userVar: regUser, rt.passVar: "wrong-password-123"}, Script: []string{"echo must-not-run"}}
			res := runJob(t, e.runner, j)
			assertUserFailure(t, res, "refused the credentials")
			assert.NotContains(t, res.RawLog, "wrong-password-123")
			assert.Len(t, res.Calls(runnerdouble.KindPrepare), 1, "a user error is not retried")
		})
		t.Run("only a user name", func(t *testing.T) {
			j := runnerdouble.Job{Image: image, Variables: map[string]string{rt.userVar: regUser}, Script: []string{"echo must-not-run"}}
			res := runJob(t, e.runner, j)
			assertRefusedBeforePull(t, res, rt.passVar+" is not set")
		})
		t.Run("job token refused", func(t *testing.T) {
			j := tokenJob(t, image)
			j.Token = "not-the-registry-token-1234"
			j.Script = []string{"echo must-not-run"}
			res := runJob(t, e.runner, j)
			assert.Equal(t, runnerdouble.ReasonRunnerSystemFailure, res.FailureReason, "a refused job token is the infrastructure's fault")
			assert.Contains(t, res.Log, "refused the job token")
			assert.Len(t, res.Calls(runnerdouble.KindPrepare), runnerdouble.PrepareAttempts, "system failures in prepare are retried")
			assert.NotContains(t, res.RawLog, j.Token)
		})
		t.Run("token not sent to another registry", func(t *testing.T) {
			// CI_REGISTRY names the anonymous registry: the token must not
			// go to 5443, so the pull is anonymous and refused.
			j := tokenJob(t, image)
			j.Registry = testenv.Fact(t, "CI_EXEC_TEST_REGISTRY_ANON")
			j.Script = []string{"echo must-not-run"}
			res := runJob(t, e.runner, j)
			assertUserFailure(t, res, "credentials: anonymous", "image not found, or access denied")
		})
		t.Run("missing image", func(t *testing.T) {
			j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_REGISTRY")+"/ci/does-not-exist:latest")
			j.Script = []string{"echo must-not-run"}
			res := runJob(t, e.runner, j)
			assertUserFailure(t, res, "image not found, or access denied")
		})
	})
}

// TestContainerRegistryFailures: a missing tag is the user's to fix (a
// build failure, not retried, naming the tag); a registry that is down is
// the system's (retried), and the log says the connection was refused,
// whether ci-exec resolves the tag or the runtime pulls a pinned digest.
func TestContainerRegistryFailures(t *testing.T) {
	forEachRuntimeAndUser(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		e := containerRunner(t, rt, u, "", "")
		t.Run("missing tag", func(t *testing.T) {
			j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_REGISTRY")+"/ci/tiny:no-such-tag")
			j.Script = []string{"echo must-not-run"}
			res := runJob(t, e.runner, j)
			assertUserFailure(t, res, `tag "no-such-tag" of `+testenv.Fact(t, "CI_EXEC_TEST_REGISTRY")+"/ci/tiny")
			assert.Len(t, res.Calls(runnerdouble.KindPrepare), 1, "a user error is not retried")
			assert.NotContains(t, res.Log, "\nmust-not-run")
		})
		for name, image := range map[string]string{
			"registry down":                "/ci/tiny:latest",
			"registry down, digest pinned": "/ci/tiny@sha256:" + strings.Repeat("ab", 32),
		} {
			t.Run(name, func(t *testing.T) {
				l, err := net.Listen("tcp", "127.0.0.1:0")
				require.NoError(t, err)
				down := l.Addr().String()
				require.NoError(t, l.Close())
				j := runnerdouble.Job{Image: down + image, Script: []string{"echo must-not-run"}}
				res := runJob(t, e.runner, j)
				assert.Equal(t, runnerdouble.StateFailed, res.State)
				assert.Equal(t, runnerdouble.ReasonRunnerSystemFailure, res.FailureReason, "a registry that is down is not the job's fault")
				assert.Len(t, res.Calls(runnerdouble.KindPrepare), runnerdouble.PrepareAttempts, "system failures in prepare are retried")
				assert.Contains(t, res.Log, "connection refused by "+down+": is the registry up?")
				assert.NotContains(t, res.Log, "HTTP response to HTTPS client")
				assert.NotContains(t, res.Log, "\nmust-not-run")
			})
		}
	})
}

func TestContainerPlacement(t *testing.T) {
	forEachRuntimeAndUser(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		runnerImage := testenv.Fact(t, "CI_EXEC_TEST_IMAGE_BASH")
		jobImage := testenv.Fact(t, "CI_EXEC_TEST_IMAGE")
		job := func() runnerdouble.Job {
			j := tokenJob(t, jobImage)
			j.Script = []string{`grep '^ID=' /etc/os-release | sed 's/^/build: /'`}
			j.AfterScript = []string{`grep '^ID=' /etc/os-release | sed 's/^/after: /'`}
			return j
		}
		t.Run("runner_image", func(t *testing.T) {
			e := containerRunner(t, rt, u, "", fmt.Sprintf("runner_image = %q", runnerImage))
			res := runJob(t, e.runner, job())
			require.True(t, res.Succeeded(), res.Error)
			assert.Contains(t, res.Log, "build: ID=citiny\n")
			assert.Contains(t, res.Log, "after: ID=citiny\n")
			for _, stage := range []string{"prepare_script", "get_sources", "cleanup_file_variables"} {
				assert.Contains(t, res.Log, "Running "+stage+" in "+runnerImage, stage+" runs in runner_image")
			}
			assert.Contains(t, res.Log, "Running build_script in "+jobImage)
		})
		t.Run("host for runner stages", func(t *testing.T) {
			e := containerRunner(t, rt, u, "", "")
			res := runJob(t, e.runner, job())
			require.True(t, res.Succeeded(), res.Error)
			assert.Contains(t, res.Log, "build: ID=citiny\n")
			assert.Contains(t, res.Log, "after: ID=citiny\n")
			assert.NotContains(t, res.Log, "Running get_sources in", "without runner_image the runner's stages run on the host")
		})
		t.Run("step_script_only", func(t *testing.T) {
			e := containerRunner(t, rt, u, "", fmt.Sprintf("runner_image = %q\nstep_script_only = true", runnerImage))
			res := runJob(t, e.runner, job())
			require.True(t, res.Succeeded(), res.Error)
			assert.Contains(t, res.Log, "build: ID=citiny\n")
			assert.Contains(t, res.Log, "after: ID=debian\n", "step_script_only runs after_script on the host")
			assert.NotContains(t, res.Log, "Running get_sources in")
			assert.Contains(t, res.Log, "runner_image is not used")
		})
		t.Run("no image", func(t *testing.T) {
			e := containerRunner(t, rt, u, "", "")
			j := job()
			j.Image = ""
			res := runJob(t, e.runner, j)
			require.True(t, res.Succeeded(), res.Error)
			assert.Contains(t, res.Log, "build: ID=debian\n", "a job without an image runs on the host")
			assert.Contains(t, res.Log, "its scripts run on the host")
		})
		t.Run("forced default image", func(t *testing.T) {
			e := containerRunner(t, rt, u, "force_mechanism = true", fmt.Sprintf("default_image = %q\nimage_allowlist = ['nothing/matches']", jobImage))
			j := job()
			j.Image = ""
			res := runJob(t, e.runner, j)
			require.True(t, res.Succeeded(), res.Error)
			assert.Contains(t, res.Log, "build: ID=citiny\n", "force_mechanism runs image-less jobs in default_image")
		})
	})
}

func TestContainerConvertedImage(t *testing.T) {
	forEachRuntimeAndUser(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		e := containerRunner(t, rt, u, "", "convert = true")
		j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
		j.Script = []string{`grep '^ID=' /etc/os-release`, "echo converted > conv.txt"}
		j.AfterScript = []string{"echo after-converted"}
		res := runJob(t, e.runner, j)
		require.True(t, res.Succeeded(), res.Error)
		assert.Contains(t, res.Log, "ID=citiny")
		assert.Contains(t, res.Log, "after-converted")
		assert.Regexp(t, rt.convertLog, res.Log)
		fi, err := os.Stat(filepath.Join(res.ProjectDir, "conv.txt"))
		require.NoError(t, err)
		assert.Equal(t, uint32(u.UID), fi.Sys().(*syscall.Stat_t).Uid)
		// cleanup removed the job's converted image with its scripts dir.
		left, _ := filepath.Glob(filepath.Join(e.data, "scripts", "*", "*", "*"))
		assert.Empty(t, left)
	})
}

func TestContainerCancelAndTimeout(t *testing.T) {
	forEachRuntimeAndUser(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		e := containerRunner(t, rt, u, "", `pull_policy = "if-not-present"`)
		t.Run("cancel", func(t *testing.T) {
			marker := fmt.Sprintf("CI_EXEC_MARKER_%d", time.Now().UnixNano())
			j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
			j.Variables = map[string]string{"PROC_MARKER": marker}
			j.Script = []string{`trap 'echo "build got TERM"; exit 143' TERM`, `sleep 1000 & sleep 1000 &`, `echo started`, `wait`}
			j.AfterScript = []string{`echo "after status=$CI_JOB_STATUS"; grep '^ID=' /etc/os-release`}
			j.CancelOnLog = "started"
			res := runJob(t, e.runner, j)
			assert.Equal(t, runnerdouble.InternalReasonJobCanceled, res.InternalFailureReason)
			assert.Contains(t, res.Log, "build got TERM", "the script's TERM trap ran in the container")
			assert.Contains(t, res.Log, "after status=canceled")
			assert.Contains(t, res.Log, "ID=citiny", "after_script of a cancelled job runs in the image")
			noProcessWith(t, marker)
			noPodmanLeft(t, e, rt, u)
		})
		t.Run("timeout", func(t *testing.T) {
			marker := fmt.Sprintf("CI_EXEC_MARKER_%d", time.Now().UnixNano())
			j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
			j.Variables = map[string]string{"PROC_MARKER": marker}
			j.Timeout = 4 * time.Second
			j.Script = []string{`echo started`, `sleep 1000`}
			j.AfterScript = []string{"echo after_script ran"}
			res := runJob(t, e.runner, j)
			assert.Equal(t, runnerdouble.ReasonJobExecutionTimeout, res.FailureReason)
			assert.NotContains(t, res.Log, "after_script ran")
			noProcessWith(t, marker)
			noPodmanLeft(t, e, rt, u)
		})
	})
}

// noPodmanLeft checks, for podman, that the job left no container in the
// user's Podman storage and no process of that storage (conmon, the
// rootless pause process, a podman): each names the storage in its
// command line or environment.
func noPodmanLeft(t *testing.T, e ctEnv, rt runtimeFixture, u testenv.User) {
	t.Helper()
	if rt.podmanSuffix == "" {
		return
	}
	storage := filepath.Join(e.storage, u.Name+rt.podmanSuffix)
	noProcessWith(t, storage)
	b, err := os.ReadFile(filepath.Join(storage, "root", "overlay-containers", "containers.json"))
	if err == nil {
		assert.JSONEq(t, "[]", string(b), "containers left in %s", storage)
	} else {
		assert.ErrorIs(t, err, fs.ErrNotExist)
	}
}

func TestContainerPrepScript(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		dir := testenv.PrivateDir(t, u)
		out := filepath.Join(dir, "prep.out")
		good := filepath.Join(dir, "prep.sh")
		require.NoError(t, os.WriteFile(good, []byte("#!/bin/sh\necho \"uid=$(id -u) image=$CI_EXEC_IMAGE mech=$CI_EXEC_MECHANISM\" > "+out+"\necho prep-script-says-hi\n"), 0o755))
		bad := filepath.Join(dir, "bad.sh")
		require.NoError(t, os.WriteFile(bad, []byte("#!/bin/sh\necho broken-prep >&2\nexit 4\n"), 0o755))
		image := testenv.Fact(t, "CI_EXEC_TEST_IMAGE")

		e := containerRunner(t, rt, u, "", fmt.Sprintf("prep_script = %q\npull_policy = \"if-not-present\"", good))
		j := tokenJob(t, image)
		j.Script = []string{"echo job-ran"}
		res := runJob(t, e.runner, j)
		require.True(t, res.Succeeded(), res.Error)
		assert.Contains(t, res.Log, "prep-script-says-hi")
		b, err := os.ReadFile(out)
		require.NoError(t, err)
		assert.Equal(t, fmt.Sprintf("uid=%d image=%s mech=%s\n", u.UID, image, rt.mechanism()), string(b), "prep_script runs on the host as the job user")

		e = containerRunner(t, rt, u, "", fmt.Sprintf("prep_script = %q", bad))
		res = runJob(t, e.runner, j)
		assert.Equal(t, runnerdouble.ReasonRunnerSystemFailure, res.FailureReason, "a broken prep_script is the admin's fault")
		assert.Contains(t, res.Log, "broken-prep")
		assert.Contains(t, res.Log, "failed with exit code 4")
		assert.NotContains(t, res.Log, "Pulling ")
	})
}

// TestContainerPrepScriptPinned: with prep_script_sha256 the script runs
// when its hash matches, and a script whose hash differs is not run at all:
// the job fails as a system failure with a line naming both hashes.
func TestContainerPrepScriptPinned(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		dir := testenv.PrivateDir(t, u)
		ran := filepath.Join(dir, "prep.ran")
		script := filepath.Join(dir, "prep.sh")
		body := []byte("#!/bin/sh\necho pinned-prep-ran > " + ran + "\n")
		require.NoError(t, os.WriteFile(script, body, 0o755))
		sum := sha256.Sum256(body)
		pin := hex.EncodeToString(sum[:])
		image := testenv.Fact(t, "CI_EXEC_TEST_IMAGE")
		j := tokenJob(t, image)
		j.Script = []string{"echo job-ran"}

		e := containerRunner(t, rt, u, "", fmt.Sprintf("prep_script = %q\nprep_script_sha256 = %q\npull_policy = \"if-not-present\"", script, pin))
		res := runJob(t, e.runner, j)
		require.True(t, res.Succeeded(), res.Error)
		b, err := os.ReadFile(ran)
		require.NoError(t, err, "the pinned script matching its hash runs")
		assert.Equal(t, "pinned-prep-ran\n", string(b))
		require.NoError(t, os.Remove(ran))

		// The admin (or anyone) changes the script without updating the pin.
		changed := append(body, []byte("echo changed\n")...)
		require.NoError(t, os.WriteFile(script, changed, 0o755))
		got := sha256.Sum256(changed)
		res = runJob(t, e.runner, j)
		assert.Equal(t, runnerdouble.ReasonRunnerSystemFailure, res.FailureReason, "a script that is not the pinned one is the admin's fault")
		assert.Contains(t, res.Log, "has SHA-256 "+hex.EncodeToString(got[:])+", not the pinned "+strings.Trim(rt.tableHeader(), "[]")+".prep_script_sha256 "+pin)
		assert.NoFileExists(t, ran, "a script whose hash differs is never run")
		assert.NotContains(t, res.Log, "Pulling ")
	})
}

func TestContainerPlainHTTPRegistryOnlyWhereAllowed(t *testing.T) {
	// Charliecloud 0.31 speaks HTTPS only (docs/charliecloud.md): only the
	// runtimes that can use plain HTTP take part.
	forEachRuntimeAndUser(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		registry := testenv.Fact(t, "CI_EXEC_TEST_REGISTRY_HTTP")
		job := func() runnerdouble.Job {
			j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE_HTTP"))
			j.Registry = registry
			j.Script = []string{`grep '^ID=' /etc/os-release`}
			return j
		}
		t.Run("not listed", func(t *testing.T) {
			e := containerRunner(t, rt, u, "", "")
			res := runJob(t, e.runner, job())
			assert.Equal(t, runnerdouble.ReasonRunnerSystemFailure, res.FailureReason)
			assert.Contains(t, res.Log, "speaks plain HTTP")
			assert.Contains(t, res.Log, "insecure_registries")
		})
		t.Run("listed", func(t *testing.T) {
			e := containerRunner(t, rt, u, "", fmt.Sprintf("insecure_registries = [%q]", registry))
			j := job()
			watch := testenv.WatchCmdlines(j.Token)
			res := runJob(t, e.runner, j)
			assert.Empty(t, watch())
			require.True(t, res.Succeeded(), res.Error)
			assert.Contains(t, res.Log, "ID=citiny")
			assert.NotContains(t, res.RawLog, j.Token)
		})
	}, func(rt runtimeFixture) bool { return rt.plainHTTP })
}
