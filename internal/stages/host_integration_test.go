package stages_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/runnerdouble"
	"github.com/ci-exec/ci-exec/internal/testenv"
)

// hostRunner is a runner double driving the built ci-exec as user u with a
// config whose [general] table gets extra lines.
func hostRunner(t *testing.T, u testenv.User, general string) (runnerdouble.Config, string) {
	t.Helper()
	dir := testenv.PrivateDir(t, u)
	data := filepath.Join(dir, "data")
	cfg := testenv.WriteConfig(t, dir, fmt.Sprintf("[general]\ndata_dir = %q\n%s", data+"/$USER", general))
	return runnerConfig(t, u, cfg, dir), filepath.Join(data, u.Name)
}

func runnerConfig(t *testing.T, u testenv.User, cfgPath, dir string) runnerdouble.Config {
	t.Helper()
	driver := testenv.Driver(t)
	args := func(stage string) []string { return []string{"--config", cfgPath, stage} }
	c := runnerdouble.Config{
		Driver:     driver,
		ConfigArgs: args("config"), PrepareArgs: args("prepare"), RunArgs: args("run"), CleanupArgs: args("cleanup"),
		// What the runner service itself had: includes a secret of the
		// runner's account that must not reach jobs.
		BaseEnv: []string{
			"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
			"HOME=/root", "USER=root", "LANG=C.UTF-8",
			"RUNNER_SERVICE_SECRET=do-not-leak-1234",
		},
		GracefulKillTimeout:  10 * time.Second,
		ForceKillTimeout:     5 * time.Second,
		PrepareRetryInterval: 100 * time.Millisecond,
		TempRoot:             dir,
	}
	if os.Getuid() != 0 || u.UID != 0 {
		c.Credential = u.Credential()
	}
	return c
}

// hostUsers are the users host-execution tests run as: root and the
// unprivileged test user.
func hostUsers(t *testing.T) []testenv.User {
	t.Helper()
	return testenv.Users(t)
}

func runJob(t *testing.T, c runnerdouble.Config, j runnerdouble.Job) *runnerdouble.Result {
	t.Helper()
	res, err := runJobErr(t, c, j)
	require.NoError(t, err)
	return res
}

// runJobErr is runJob for goroutines, which must not stop the test
// (require): the test's goroutine checks the error.
func runJobErr(t *testing.T, c runnerdouble.Config, j runnerdouble.Job) (*runnerdouble.Result, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	res, err := c.Run(ctx, j)
	if err != nil {
		return nil, err
	}
	t.Logf("job log:\n%s\nrunner log:\n%s", res.Log, res.RunnerLog)
	return res, nil
}

func TestHostJobSucceeds(t *testing.T) {
	for _, u := range hostUsers(t) {
		t.Run(u.Name, func(t *testing.T) {
			c, data := hostRunner(t, u, `job_message = "Welcome to the test cluster"`)
			res := runJob(t, c, runnerdouble.Job{
				Variables: map[string]string{"GREETING": "hello from the job"},
				Script: []string{
					`echo "$GREETING"`,
					`echo "home=$HOME user=$(id -un) pwd=$PWD"`,
					`echo "runner secret=[${RUNNER_SERVICE_SECRET:-unset}]"`,
					`echo artifact > made-by-job.txt`,
				},
				AfterScript: []string{`echo "after status=$CI_JOB_STATUS"`},
				ExtraSteps:  []string{"step_release", "step_future_thing"},
			})
			require.True(t, res.Succeeded(), res.Error)
			assert.Equal(t, []string{"prepare_script", "get_sources", "build_script", "step_release", "step_future_thing",
				"after_script", "cleanup_file_variables"}, res.RunStages())
			assert.Contains(t, res.Log, "Using Custom executor with driver ci-exec")
			assert.Contains(t, res.Log, "Welcome to the test cluster")
			assert.Contains(t, res.Log, "hello from the job")
			assert.Contains(t, res.Log, fmt.Sprintf("home=%s user=%s pwd=%s", u.Home, u.Name, res.ProjectDir))
			assert.Contains(t, res.Log, "runner secret=[unset]", "the runner's own environment must not leak into jobs")
			assert.Contains(t, res.Log, "after status=success")
			assert.Contains(t, res.Log, "step_future_thing", "unknown step_* stages run like user scripts")

			// config_exec's answer follows the contract.
			out := res.ConfigOutput
			require.NotNil(t, out)
			require.NotNil(t, out.BuildsDirIsShared)
			assert.False(t, *out.BuildsDirIsShared)
			assert.Equal(t, "ci-exec", *out.Driver.Name)
			assert.True(t, strings.HasPrefix(*out.BuildsDir, data+"/builds/"), *out.BuildsDir)
			assert.True(t, strings.HasPrefix(*out.CacheDir, data+"/cache/"), *out.CacheDir)

			// Files belong to the job user; data dirs are private.
			fi, err := os.Stat(filepath.Join(res.ProjectDir, "made-by-job.txt"))
			require.NoError(t, err)
			assert.Equal(t, uint32(u.UID), fi.Sys().(*syscall.Stat_t).Uid)
			for _, d := range []string{"builds", "cache", "scripts"} {
				fi, err := os.Stat(filepath.Join(data, d))
				require.NoError(t, err)
				assert.Equal(t, os.FileMode(0o700), fi.Mode().Perm(), d)
				assert.Equal(t, uint32(u.UID), fi.Sys().(*syscall.Stat_t).Uid, d)
			}
			// cleanup removed the job's scripts dir.
			entries, _ := filepath.Glob(filepath.Join(data, "scripts", "*", "*", "*"))
			assert.Empty(t, entries, "per-job scripts dir must be gone after cleanup")
		})
	}
}

func TestHostExitCodes(t *testing.T) {
	for _, u := range hostUsers(t) {
		t.Run(u.Name, func(t *testing.T) {
			c, _ := hostRunner(t, u, "")
			for _, code := range []int{3, 137, 1} {
				res := runJob(t, c, runnerdouble.Job{
					Script:      []string{"echo before", fmt.Sprintf("exit %d", code), "echo never"},
					AfterScript: []string{`echo "after status=$CI_JOB_STATUS"`},
				})
				assert.Equal(t, runnerdouble.StateFailed, res.State)
				assert.Equal(t, runnerdouble.ReasonScriptFailure, res.FailureReason)
				assert.Equal(t, code, res.ExitCode)
				assert.Contains(t, res.Log, fmt.Sprintf("exit status %d", code))
				assert.NotContains(t, res.Log, "never")
				assert.Contains(t, res.Log, "after status=failed", "after_script runs after a failed build")
			}
		})
	}
}

// noProcessWith waits briefly for processes carrying marker to vanish and
// fails if any is left.
func noProcessWith(t *testing.T, marker string) {
	t.Helper()
	assert.Eventually(t, func() bool { return len(runnerdouble.ProcessesWithMarker(marker)) == 0 },
		5*time.Second, 50*time.Millisecond, "processes left behind: %v", runnerdouble.ProcessesWithMarker(marker))
}

func TestHostCancelRunsAfterScriptAndLeavesNothing(t *testing.T) {
	for _, u := range hostUsers(t) {
		t.Run(u.Name, func(t *testing.T) {
			c, _ := hostRunner(t, u, `kill_timeout = "5s"`)
			marker := fmt.Sprintf("CI_EXEC_MARKER_%d", time.Now().UnixNano())
			res := runJob(t, c, runnerdouble.Job{
				Variables: map[string]string{"PROC_MARKER": marker},
				Script: []string{
					`trap 'echo "build got TERM"; exit 143' TERM`,
					`sleep 1000 & sleep 1000 &`,
					`(setsid sleep 1000 < /dev/null > /dev/null 2>&1 &)`,
					`echo started`,
					`wait`,
				},
				AfterScript: []string{`echo "after status=$CI_JOB_STATUS"`},
				CancelOnLog: "started",
			})
			assert.Equal(t, runnerdouble.StateFailed, res.State)
			assert.Equal(t, runnerdouble.InternalReasonJobCanceled, res.InternalFailureReason)
			assert.Contains(t, res.Log, "build got TERM", "the script's TERM trap ran")
			assert.Contains(t, res.Log, "after status=canceled")
			assert.Equal(t, []string{"prepare_script", "get_sources", "build_script", "after_script", "cleanup_file_variables"}, res.RunStages())
			noProcessWith(t, marker)
		})
	}
}

func TestHostTimeout(t *testing.T) {
	for _, u := range hostUsers(t) {
		t.Run(u.Name, func(t *testing.T) {
			c, _ := hostRunner(t, u, `kill_timeout = "5s"`)
			marker := fmt.Sprintf("CI_EXEC_MARKER_%d", time.Now().UnixNano())
			res := runJob(t, c, runnerdouble.Job{
				Variables:   map[string]string{"PROC_MARKER": marker},
				Timeout:     3 * time.Second,
				Script:      []string{"echo started", "sleep 1000"},
				AfterScript: []string{"echo after_script ran"},
			})
			assert.Equal(t, runnerdouble.ReasonJobExecutionTimeout, res.FailureReason)
			assert.Equal(t, 0, res.ExitCode)
			assert.NotContains(t, res.Log, "after_script ran", "after_script does not run on timeout")
			assert.NotContains(t, res.RunStages(), "after_script")
			assert.Len(t, res.Calls(runnerdouble.KindCleanup), 1)
			noProcessWith(t, marker)
		})
	}
}

func TestHostScriptIgnoringSIGTERMIsKilled(t *testing.T) {
	for _, u := range hostUsers(t) {
		t.Run(u.Name, func(t *testing.T) {
			// ci-exec's kill_timeout (1s) is shorter than the runner's
			// graceful timeout (10s): ci-exec must SIGKILL the stubborn
			// script itself and exit, so the runner never has to.
			c, _ := hostRunner(t, u, `kill_timeout = "1s"`)
			marker := fmt.Sprintf("CI_EXEC_MARKER_%d", time.Now().UnixNano())
			res := runJob(t, c, runnerdouble.Job{
				Variables:   map[string]string{"PROC_MARKER": marker},
				Script:      []string{`trap '' TERM`, `echo started`, `while true; do sleep 0.1; done`},
				AfterScript: []string{"echo after_script ran"},
				CancelOnLog: "started",
			})
			assert.Equal(t, runnerdouble.InternalReasonJobCanceled, res.InternalFailureReason)
			build := res.Call("build_script")
			require.NotNil(t, build)
			assert.True(t, build.Terminated)
			assert.False(t, build.ForceKilled, "ci-exec exited on its own within the runner's grace period")
			assert.Contains(t, res.Log, "did not stop within kill_timeout")
			assert.Contains(t, res.Log, "after_script ran")
			noProcessWith(t, marker)
		})
	}
}

func TestBrokenConfigIsSystemFailure(t *testing.T) {
	u := testenv.Root(t)
	cases := map[string]struct {
		content string
		want    string
	}{
		"typo":             {"[general]\ndata_dir = \"/var/tmp/x\"\nexecuter = \"shell\"\n", `unknown key "general.executer"`},
		"missing data_dir": {"[general]\n", "general.data_dir is required"},
		"syntax":           {"[general\n", "config "},
		"missing file":     {"", "read config"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			dir := testenv.PrivateDir(t, u)
			cfgPath := filepath.Join(dir, "absent.toml")
			if tc.content != "" {
				cfgPath = testenv.WriteConfig(t, dir, tc.content)
			}
			res := runJob(t, runnerConfig(t, u, cfgPath, dir), runnerdouble.Job{Script: []string{"echo should not run"}})
			assert.Equal(t, runnerdouble.ReasonRunnerSystemFailure, res.FailureReason)
			assert.Contains(t, res.Log, tc.want)
			assert.NotContains(t, res.Log, "should not run\n")
			assert.Len(t, res.Calls(runnerdouble.KindConfig), runnerdouble.PrepareAttempts, "a system failure is retried")
			assert.Len(t, res.Calls(runnerdouble.KindCleanup), runnerdouble.PrepareAttempts, "cleanup runs after every failed attempt")
		})
	}
}

func TestConfigStdoutIsOnlyJSON(t *testing.T) {
	u := testenv.Root(t)
	c, _ := hostRunner(t, u, "")
	res := runJob(t, c, runnerdouble.Job{Script: []string{"true"}})
	require.True(t, res.Succeeded())
	require.NotNil(t, res.ConfigOutput.JobEnv)
	env := *res.ConfigOutput.JobEnv
	for _, k := range []string{"CI_EXEC_DATA_DIR", "CI_EXEC_BUILDS_DIR", "CI_EXEC_CACHE_DIR", "CI_EXEC_SCRIPTS_DIR"} {
		assert.True(t, filepath.IsAbs(env[k]), k)
	}
	b, err := json.Marshal(res.ConfigOutput)
	require.NoError(t, err)
	assert.NotContains(t, string(b), runnerdouble.DefaultToken)
}
