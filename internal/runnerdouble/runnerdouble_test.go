package runnerdouble

import (
	"github.com/ci-exec/ci-exec/internal/jobscript"

	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/testenv"
)

// fake is a test fixture around testdata/fakedriver.sh.
type fake struct {
	root, rec, driver string
	cfg               Config
}

func newFake(t *testing.T) *fake {
	t.Helper()
	return newFakeIn(t, t.TempDir())
}

func newFakeIn(t *testing.T, root string) *fake {
	t.Helper()
	src, err := os.ReadFile("testdata/fakedriver.sh")
	require.NoError(t, err)
	f := &fake{root: root, rec: filepath.Join(root, "rec"), driver: filepath.Join(root, "fakedriver.sh")}
	require.NoError(t, os.MkdirAll(f.rec, 0o777))
	require.NoError(t, os.WriteFile(f.driver, src, 0o755))
	tempRoot := filepath.Join(root, "tmp")
	require.NoError(t, os.MkdirAll(tempRoot, 0o777))
	f.cfg = Config{
		Driver:               f.driver,
		ConfigArgs:           []string{"config"},
		PrepareArgs:          []string{"prepare"},
		RunArgs:              []string{"run"},
		CleanupArgs:          []string{"cleanup"},
		BaseEnv:              []string{"PATH=" + os.Getenv("PATH"), "FAKE_REC=" + f.rec, "FAKE_ROOT=" + root, "LANG=C"},
		GracefulKillTimeout:  time.Second,
		ForceKillTimeout:     2 * time.Second,
		PrepareRetryInterval: 50 * time.Millisecond,
		TempRoot:             tempRoot,
	}
	return f
}

// file returns the content of the last recorded file whose name ends in "-"+suffix.
func (f *fake) file(t *testing.T, suffix string) string {
	t.Helper()
	matches, err := filepath.Glob(filepath.Join(f.rec, "*-"+suffix))
	require.NoError(t, err)
	require.NotEmpty(t, matches, "no recorded file *-%s", suffix)
	sort.Slice(matches, func(i, k int) bool { return seqOf(matches[i]) < seqOf(matches[k]) })
	b, err := os.ReadFile(matches[len(matches)-1])
	require.NoError(t, err)
	return string(b)
}

func (f *fake) has(suffix string) bool {
	matches, _ := filepath.Glob(filepath.Join(f.rec, "*-"+suffix))
	return len(matches) > 0
}

func seqOf(p string) int {
	n, _ := strconv.Atoi(strings.SplitN(filepath.Base(p), "-", 2)[0])
	return n
}

// env returns the recorded environment of the last call named name
// ("config", "prepare", "run-build_script", "cleanup", ...).
func (f *fake) env(t *testing.T, name string) map[string]string {
	t.Helper()
	m := map[string]string{}
	for _, l := range strings.Split(f.file(t, name+".env"), "\n") {
		if k, v, ok := strings.Cut(l, "="); ok {
			m[k] = v
		}
	}
	return m
}

func kinds(res *Result) []string {
	var out []string
	for _, c := range res.Stages {
		if c.Kind == KindRun {
			out = append(out, "run:"+c.Stage)
		} else {
			out = append(out, c.Kind)
		}
	}
	return out
}

func envIndex(env []string, key string) int {
	for i, kv := range env {
		if strings.HasPrefix(kv, key+"=") {
			return i
		}
	}
	return -1
}

func TestSuccessfulJob(t *testing.T) {
	f := newFake(t)
	job := Job{
		Image:           "alpine:3",
		Registry:        "registry.example:5000",
		ConcurrentID:    4,
		Variables:       map[string]string{"DEMO_GREETING": "it's me", "FAKE_OVERRIDE": "from-user"},
		MaskedVariables: map[string]string{"DEMO_SECRET": "s3cr3t-value-42"},
		Script:          []string{"echo \"greeting=$DEMO_GREETING\"", "echo \"secret=$DEMO_SECRET\"", "pwd", "echo status=$CI_JOB_STATUS"},
		AfterScript:     []string{"echo after status=$CI_JOB_STATUS"},
		Timeout:         30 * time.Second,
	}
	var live strings.Builder
	f.cfg.LiveLog = &live
	res, err := f.cfg.Run(context.Background(), job)
	require.NoError(t, err)
	t.Log(res.Log)

	assert.Equal(t, StateSuccess, res.State)
	assert.Empty(t, res.FailureReason)
	assert.Equal(t, 0, res.ExitCode)
	assert.Equal(t, []string{"config", "prepare", "run:prepare_script", "run:get_sources", "run:build_script",
		"run:after_script", "run:cleanup_file_variables", "cleanup"}, kinds(res))
	for _, c := range res.Stages {
		assert.Equal(t, 0, c.ExitCode, c.Kind+" "+c.Stage)
		assert.Equal(t, c.Pid, c.Pgid)
		assert.Equal(t, res.TempDir, c.Dir)
	}

	projectDir := filepath.Join(f.root, "builds", "demo-group", "demo")
	assert.Equal(t, projectDir, res.ProjectDir)
	assert.Equal(t, filepath.Join(f.root, "builds"), res.BuildsDir)
	assert.Equal(t, filepath.Join(f.root, "cache"), res.CacheDir)
	assert.DirExists(t, projectDir, "get_sources creates the project dir")
	assert.NoDirExists(t, res.TempDir, "temp dir removed after cleanup")

	// job log
	assert.Contains(t, res.Log, "Running with gitlab-runner 19.4.0")
	assert.Contains(t, res.Log, "Using Custom executor with driver fakedrv 0.0.1...\n")
	assert.Contains(t, res.Log, "config says hello on stderr\n")
	assert.Contains(t, res.Log, "preparing fake environment\n")
	assert.Contains(t, res.Log, " via drv-host...\n")
	assert.Contains(t, res.Log, "Skipping Git repository setup\n")
	assert.Contains(t, res.Log, `Executing "step_script" stage of the job script`)
	assert.Contains(t, res.Log, "$ echo \"greeting=$DEMO_GREETING\"\ngreeting=it's me\n")
	assert.Contains(t, res.Log, "secret=[MASKED]\n")
	assert.NotContains(t, res.Log, "s3cr3t-value-42")
	assert.Contains(t, res.RawLog, "secret=s3cr3t-value-42\n")
	assert.Contains(t, res.Log, "\n"+projectDir+"\n", "user script runs in the project dir")
	assert.Contains(t, res.Log, "status=running\n")
	assert.Contains(t, res.Log, "Running after script...\n$ echo after status=$CI_JOB_STATUS\nafter status=success\n")
	assert.True(t, strings.HasSuffix(res.Log, "Job succeeded\n"))
	assert.NotContains(t, res.Log, "cleanup on")
	assert.Contains(t, res.RunnerLog, "cleanup on stdout")
	assert.Contains(t, res.RunnerLog, "cleanup on stderr")
	assert.Equal(t, res.Log, live.String())

	// config_exec output decoded (unknown keys ignored)
	require.NotNil(t, res.ConfigOutput)
	require.NotNil(t, res.ConfigOutput.Hostname)
	assert.Equal(t, "drv-host", *res.ConfigOutput.Hostname)

	// response.json
	mode, err := os.ReadFile(filepath.Join(f.rec, "response.mode"))
	require.NoError(t, err)
	assert.Equal(t, "600\n", string(mode))
	body, err := os.ReadFile(filepath.Join(f.rec, "response.json"))
	require.NoError(t, err)
	var payload map[string]any
	require.NoError(t, json.Unmarshal(body, &payload))
	assert.EqualValues(t, 1, payload["id"])
	assert.Equal(t, DefaultToken, payload["token"])
	assert.Equal(t, "demo-group/demo", payload["job_info"].(map[string]any)["project_full_path"])
	assert.EqualValues(t, 30, payload["runner_info"].(map[string]any)["timeout"])
	assert.Equal(t, "alpine:3", payload["image"].(map[string]any)["name"])
	assert.Equal(t, []any{}, payload["services"])
	steps := payload["steps"].([]any)
	require.Len(t, steps, 2)
	assert.Equal(t, "script", steps[0].(map[string]any)["name"])
	assert.Equal(t, "after_script", steps[1].(map[string]any)["name"])
	vars := map[string]map[string]any{}
	for _, v := range payload["variables"].([]any) {
		vm := v.(map[string]any)
		vars[vm["key"].(string)] = vm
	}
	assert.Equal(t, true, vars["CI_JOB_TOKEN"]["masked"])
	assert.Equal(t, true, vars["DEMO_SECRET"]["masked"])
	assert.Equal(t, "registry.example:5000", vars["CI_REGISTRY"]["value"])
	assert.Equal(t, "none", vars["GIT_STRATEGY"]["value"])
	assert.NotContains(t, vars, "CI_PROJECT_DIR", "runner-side variables are not in the payload")

	// environment of the calls
	cfgEnv := f.env(t, "config")
	assert.Equal(t, res.TempDir, cfgEnv["TMPDIR"])
	assert.Equal(t, res.TempDir+"\n", f.file(t, "config.pwd"))
	assert.Equal(t, "1", cfgEnv["BUILD_FAILURE_EXIT_CODE"])
	assert.Equal(t, "2", cfgEnv["SYSTEM_FAILURE_EXIT_CODE"])
	assert.Equal(t, filepath.Join(res.TempDir, "build_exit_code"), cfgEnv["BUILD_EXIT_CODE_FILE"])
	assert.Equal(t, filepath.Join(res.TempDir, "response.json"), cfgEnv["JOB_RESPONSE_FILE"])
	assert.NotContains(t, cfgEnv, "FAKE_JOB_ENV", "job_env never reaches config_exec")
	assert.Contains(t, cfgEnv, "CUSTOM_ENV_CI_PROJECT_DIR")
	assert.Empty(t, cfgEnv["CUSTOM_ENV_CI_PROJECT_DIR"])
	assert.Empty(t, cfgEnv["CUSTOM_ENV_CI_BUILDS_DIR"])
	assert.Equal(t, "alpine:3", cfgEnv["CUSTOM_ENV_CI_JOB_IMAGE"])
	assert.Equal(t, DefaultToken, cfgEnv["CUSTOM_ENV_CI_JOB_TOKEN"], "masked variables in clear")
	assert.Equal(t, "s3cr3t-value-42", cfgEnv["CUSTOM_ENV_DEMO_SECRET"])
	assert.Equal(t, "registry.example:5000", cfgEnv["CUSTOM_ENV_CI_REGISTRY"])
	assert.Equal(t, ServerURL, cfgEnv["CUSTOM_ENV_CI_SERVER_URL"])
	assert.Equal(t, "4", cfgEnv["CUSTOM_ENV_CI_CONCURRENT_ID"])
	assert.Equal(t, "4", cfgEnv["CUSTOM_ENV_CI_CONCURRENT_PROJECT_ID"])
	assert.Equal(t, "t3stt0k3n", cfgEnv["CUSTOM_ENV_CI_RUNNER_SHORT_TOKEN"])
	assert.Equal(t, "demo-group/demo", cfgEnv["CUSTOM_ENV_CI_PROJECT_PATH"])
	assert.Equal(t, "demo", cfgEnv["CUSTOM_ENV_CI_PROJECT_NAME"])
	assert.Equal(t, "test", cfgEnv["CUSTOM_ENV_CI_JOB_NAME"])
	assert.Equal(t, "1", cfgEnv["CUSTOM_ENV_CI_JOB_ID"])
	assert.Equal(t, "30", cfgEnv["CUSTOM_ENV_CI_JOB_TIMEOUT"])
	assert.Equal(t, "19.4.0", cfgEnv["CUSTOM_ENV_CI_RUNNER_VERSION"])
	assert.Equal(t, "none", cfgEnv["CUSTOM_ENV_GIT_STRATEGY"])
	assert.Equal(t, "running", cfgEnv["CUSTOM_ENV_CI_JOB_STATUS"])
	assert.Contains(t, cfgEnv, "CUSTOM_ENV_CI_JOB_SERVICES")
	assert.Empty(t, cfgEnv["CUSTOM_ENV_CI_JOB_SERVICES"])

	for _, name := range []string{"prepare", "run-prepare_script", "run-build_script", "cleanup"} {
		env := f.env(t, name)
		assert.Equal(t, "from-config", env["FAKE_JOB_ENV"], name)
		assert.Equal(t, projectDir, env["CUSTOM_ENV_CI_PROJECT_DIR"], name)
		assert.Equal(t, filepath.Join(f.root, "builds"), env["CUSTOM_ENV_CI_BUILDS_DIR"], name)
		assert.Equal(t, "from-user", env["CUSTOM_ENV_FAKE_OVERRIDE"], "job_env cannot override CUSTOM_ENV_ (%s)", name)
	}
	assert.Equal(t, "running", f.env(t, "run-build_script")["CUSTOM_ENV_CI_JOB_STATUS"])
	assert.Equal(t, "success", f.env(t, "run-after_script")["CUSTOM_ENV_CI_JOB_STATUS"])
	assert.Equal(t, "success", f.env(t, "run-cleanup_file_variables")["CUSTOM_ENV_CI_JOB_STATUS"])
	assert.Equal(t, "success", f.env(t, "cleanup")["CUSTOM_ENV_CI_JOB_STATUS"])

	// order of the environment (§5.1)
	run := res.Call("build_script")
	require.NotNil(t, run)
	order := []string{"PATH", "TMPDIR", "BUILD_FAILURE_EXIT_CODE", "SYSTEM_FAILURE_EXIT_CODE", "BUILD_EXIT_CODE_FILE",
		"JOB_RESPONSE_FILE", "FAKE_JOB_ENV", "CUSTOM_ENV_CI_PROJECT_DIR", "CUSTOM_ENV_CI_JOB_SERVICES"}
	last := -1
	for _, k := range order {
		i := envIndex(run.Env, k)
		require.GreaterOrEqual(t, i, 0, k)
		assert.Greater(t, i, last, "%s out of order", k)
		last = i
	}
	assert.Equal(t, "CUSTOM_ENV_FAKE_OVERRIDE=from-user", run.Env[envIndex(run.Env, "CUSTOM_ENV_FAKE_OVERRIDE")],
		"duplicate keys deduplicated, last wins")
	assert.Equal(t, []string{"run", run.ScriptPath, "build_script"}, run.Args)
}

func TestScriptFiles(t *testing.T) {
	f := newFake(t)
	f.cfg.KeepTemp = true
	res, err := f.cfg.Run(context.Background(), Job{Script: []string{"echo one"}, AfterScript: []string{"echo two"}})
	require.NoError(t, err)
	require.Equal(t, StateSuccess, res.State, res.Log)
	t.Cleanup(func() { _ = os.RemoveAll(res.TempDir) })

	seen := map[string]bool{}
	for _, c := range res.Calls(KindRun) {
		require.NotEmpty(t, c.ScriptPath)
		assert.False(t, seen[c.ScriptPath], "script file reused for %s", c.Stage)
		seen[c.ScriptPath] = true
		assert.Equal(t, res.TempDir, filepath.Dir(filepath.Dir(c.ScriptPath)))
		assert.True(t, strings.HasPrefix(filepath.Base(filepath.Dir(c.ScriptPath)), "script"))
		assert.Equal(t, "script", filepath.Base(c.ScriptPath))
		st, err := os.Stat(c.ScriptPath)
		require.NoError(t, err)
		assert.Equal(t, os.FileMode(0o700), st.Mode().Perm(), c.Stage)
		assert.Equal(t, "700\n", f.file(t, "run-"+c.Stage+".mode"))

		body := f.file(t, "run-"+c.Stage+".script")
		assert.True(t, strings.HasPrefix(body, "#!/usr/bin/env bash\n\ntrap 'exit 1' TERM\n"), c.Stage)
		assert.Contains(t, body, "set -o errexit")
		assert.Contains(t, body, "set -o pipefail")
		assert.Contains(t, body, ") < /dev/null\nexit 0\n")
	}
	assert.Len(t, seen, 5)
	build := f.file(t, "run-build_script.script")
	assert.Contains(t, build, "export CI_PROJECT_DIR=")
	// the body is ANSI-C quoted inside eval $'...', its own quotes escaped
	assert.Contains(t, build, "(trap 'exit 1' TERM; eval $'export ")
	assert.Contains(t, build, `\ncd `+res.ProjectDir+`\n`)
	assert.Contains(t, build, `\necho $\'$ echo one\'\necho one\n') < /dev/null`)
	st, err := os.Stat(filepath.Join(res.TempDir, "response.json"))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), st.Mode().Perm())
}

func TestScriptFailureExitCode(t *testing.T) {
	f := newFake(t)
	res, err := f.cfg.Run(context.Background(), Job{
		Script:      []string{"echo before", "exit 3", "echo never"},
		AfterScript: []string{"echo after status=$CI_JOB_STATUS"},
	})
	require.NoError(t, err)
	t.Log(res.Log)
	assert.Equal(t, StateFailed, res.State)
	assert.Equal(t, ReasonScriptFailure, res.FailureReason)
	assert.Equal(t, 3, res.ExitCode)
	assert.Equal(t, 1, res.Call("build_script").ExitCode)
	assert.NotContains(t, res.Log, "never")
	assert.Contains(t, res.Log, "after status=failed\n")
	assert.Equal(t, "failed", f.env(t, "cleanup")["CUSTOM_ENV_CI_JOB_STATUS"])
	assert.Equal(t, []string{"prepare_script", "get_sources", "build_script", "after_script", "cleanup_file_variables"},
		res.RunStages())
	assert.True(t, strings.HasSuffix(res.Log, "ERROR: Job failed: exit status 3\n"), res.Log)
}

func TestExitCodeMapping(t *testing.T) {
	cases := []struct {
		name     string
		vars     map[string]string
		script   string
		reason   string
		exitCode int
		logLine  string
	}{
		{"build failure without file", map[string]string{"FAKE_RAW_EXIT": "build_script"}, "exit 1",
			ReasonScriptFailure, 1, "ERROR: Job failed: exit status 1"},
		{"system failure", map[string]string{"FAKE_RAW_EXIT": "build_script"}, "exit 2",
			ReasonRunnerSystemFailure, 0, "ERROR: Job failed (system failure): exit status 2"},
		{"unknown exit code", map[string]string{"FAKE_RAW_EXIT": "build_script"}, "exit 5",
			ReasonRunnerSystemFailure, 0, "unknown Custom executor executable exit code 5"},
		{"exit code file not an int", map[string]string{"FAKE_BADFILE": "build_script"}, "exit 4",
			ReasonRunnerSystemFailure, 0, "unknown Custom executor executable exit code 2"},
		{"pipefail", nil, "false | true", ReasonScriptFailure, 1, "ERROR: Job failed: exit status 1"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := newFake(t)
			res, err := f.cfg.Run(context.Background(), Job{Variables: tc.vars, Script: []string{tc.script}})
			require.NoError(t, err)
			assert.Equal(t, StateFailed, res.State)
			assert.Equal(t, tc.reason, res.FailureReason)
			assert.Equal(t, tc.exitCode, res.ExitCode)
			assert.Contains(t, res.Log, tc.logLine)
			assert.Equal(t, "cleanup", res.Stages[len(res.Stages)-1].Kind)
		})
	}
}

func TestBuildExitCodeFileDeletedBeforeEachCall(t *testing.T) {
	// build_script writes 3 to BUILD_EXIT_CODE_FILE; after_script exits 1
	// without writing it. The double deletes the file before every call, so
	// after_script's failure is "exit status 1"; with KeepBuildExitCodeFile
	// (the real runner) the stale 3 is read.
	job := Job{
		Variables:   map[string]string{"FAKE_RAW_EXIT": "after_script"},
		Script:      []string{"exit 3"},
		AfterScript: []string{"exit 1"},
	}
	f := newFake(t)
	res, err := f.cfg.Run(context.Background(), job)
	require.NoError(t, err)
	assert.Equal(t, 3, res.ExitCode)
	assert.Contains(t, res.Log, "WARNING: after_script failed, but job will continue unaffected: exit status 1\n")

	f.cfg.KeepBuildExitCodeFile = true
	res, err = f.cfg.Run(context.Background(), job)
	require.NoError(t, err)
	assert.Equal(t, 3, res.ExitCode)
	assert.Contains(t, res.Log, "WARNING: after_script failed, but job will continue unaffected: exit status 3\n")
}

func TestPrepareSystemFailureIsRetried(t *testing.T) {
	f := newFake(t)
	res, err := f.cfg.Run(context.Background(), Job{
		Variables: map[string]string{"FAKE_PREPARE_EXIT": "2"},
		Script:    []string{"echo hi"},
	})
	require.NoError(t, err)
	t.Log(res.Log)
	assert.Equal(t, []string{"config", "prepare", "cleanup", "config", "prepare", "cleanup", "config", "prepare", "cleanup"},
		kinds(res))
	assert.Equal(t, StateFailed, res.State)
	assert.Equal(t, ReasonRunnerSystemFailure, res.FailureReason)
	assert.Equal(t, 3, strings.Count(res.Log, "ERROR: Preparation failed: exit status 2\n"))
	assert.Contains(t, res.Log, "Will be retried in 50ms ...")
	assert.True(t, strings.HasSuffix(res.Log, "ERROR: Job failed (system failure): exit status 2\n"), res.Log)
	require.Len(t, res.TempDirs, 3)
	for _, d := range res.TempDirs {
		assert.NoDirExists(t, d)
	}
	assert.Equal(t, 3, strings.Count(res.RunnerLog, "cleanup on stdout"))
}

func TestPrepareBuildFailureIsNotRetried(t *testing.T) {
	f := newFake(t)
	res, err := f.cfg.Run(context.Background(), Job{
		Variables: map[string]string{"FAKE_PREPARE_EXIT": "1"},
		Script:    []string{"echo hi"},
	})
	require.NoError(t, err)
	assert.Equal(t, []string{"config", "prepare", "cleanup"}, kinds(res))
	assert.Equal(t, ReasonScriptFailure, res.FailureReason)
	assert.Equal(t, 1, res.ExitCode)
	assert.Contains(t, res.Log, "ERROR: Job failed: exit status 1\n")
}

func TestConfigBadJSONIsRetried(t *testing.T) {
	f := newFake(t)
	res, err := f.cfg.Run(context.Background(), Job{Variables: map[string]string{"FAKE_CONFIG_MODE": "badjson"}})
	require.NoError(t, err)
	assert.Equal(t, []string{"config", "cleanup", "config", "cleanup", "config", "cleanup"}, kinds(res))
	assert.Equal(t, ReasonRunnerSystemFailure, res.FailureReason)
	assert.Contains(t, res.Log, "error while parsing JSON output")
}

func TestBuildsDirRequired(t *testing.T) {
	f := newFake(t)
	job := Job{Variables: map[string]string{"FAKE_CONFIG_MODE": "nobuilds"}, Script: []string{"pwd"}}
	res, err := f.cfg.Run(context.Background(), job)
	require.NoError(t, err)
	assert.Equal(t, []string{"config", "cleanup"}, kinds(res))
	assert.Equal(t, StateFailed, res.State)
	assert.Equal(t, ReasonScriptFailure, res.FailureReason)
	assert.Equal(t, InternalReasonConfigurationError, res.InternalFailureReason)
	assert.Contains(t, res.Log, "Using Custom executor...\n")
	assert.Contains(t, res.Log, "ERROR: Job failed: the builds_dir is not configured\n")

	// the [[runners]] builds_dir is the fallback
	f.cfg.BuildsDir = filepath.Join(f.root, "fallback")
	res, err = f.cfg.Run(context.Background(), job)
	require.NoError(t, err)
	assert.Equal(t, StateSuccess, res.State, res.Log)
	assert.Equal(t, filepath.Join(f.root, "fallback", "demo-group", "demo"), res.ProjectDir)
}

func TestSharedBuildsDir(t *testing.T) {
	f := newFake(t)
	res, err := f.cfg.Run(context.Background(), Job{
		ConcurrentID: 2,
		Variables:    map[string]string{"FAKE_CONFIG_MODE": "shared"},
		Script:       []string{"pwd"},
	})
	require.NoError(t, err)
	want := filepath.Join(f.root, "builds", "t3stt0k3n", "2", "demo-group", "demo")
	assert.Equal(t, want, res.ProjectDir)
	assert.Contains(t, res.Log, "\n"+want+"\n")
}

func TestExtraSteps(t *testing.T) {
	f := newFake(t)
	res, err := f.cfg.Run(context.Background(), Job{
		Script:      []string{"echo main"},
		ExtraSteps:  []string{"step_release", "step_future_thing"},
		AfterScript: []string{"echo after"},
	})
	require.NoError(t, err)
	assert.Equal(t, StateSuccess, res.State, res.Log)
	assert.Equal(t, []string{"prepare_script", "get_sources", "build_script", "step_release", "step_future_thing",
		"after_script", "cleanup_file_variables"}, res.RunStages())
	assert.Contains(t, res.Log, "\nstep_release\n")
	assert.Contains(t, res.Log, "\nstep_future_thing\n")
}

func TestTimeout(t *testing.T) {
	f := newFake(t)
	marker := fmt.Sprintf("rd-timeout-%d", time.Now().UnixNano())
	res, err := f.cfg.Run(context.Background(), Job{
		Timeout:     time.Second,
		Variables:   map[string]string{"RD_MARKER": marker},
		Script:      []string{"echo started", "sleep 30"},
		AfterScript: []string{"echo after"},
	})
	require.NoError(t, err)
	t.Log(res.Log)
	assert.Equal(t, StateFailed, res.State)
	assert.Equal(t, ReasonJobExecutionTimeout, res.FailureReason)
	assert.Equal(t, 0, res.ExitCode)
	assert.Equal(t, []string{"prepare_script", "get_sources", "build_script"}, res.RunStages(),
		"after_script and cleanup_file_variables are skipped")
	assert.Equal(t, "cleanup", res.Stages[len(res.Stages)-1].Kind)
	build := res.Call("build_script")
	assert.True(t, build.Terminated)
	assert.False(t, build.ForceKilled)
	assert.Contains(t, res.Log, "ERROR: Job failed: execution took longer than 1s seconds\n")
	assert.Empty(t, ProcessesInGroup(build.Pgid))
	assert.Empty(t, ProcessesWithMarker(marker))
}

func TestCancelOnLog(t *testing.T) {
	f := newFake(t)
	marker := fmt.Sprintf("rd-cancel-%d", time.Now().UnixNano())
	res, err := f.cfg.Run(context.Background(), Job{
		Variables:   map[string]string{"RD_MARKER": marker},
		Script:      []string{"echo started", "sleep 30 &", "sleep 30"},
		AfterScript: []string{"echo after status=$CI_JOB_STATUS"},
		CancelOnLog: "started",
	})
	require.NoError(t, err)
	t.Log(res.Log)
	assert.Equal(t, StateFailed, res.State)
	assert.Equal(t, ReasonUnknownFailure, res.FailureReason)
	assert.Equal(t, InternalReasonJobCanceled, res.InternalFailureReason)
	assert.Equal(t, 0, res.ExitCode)
	assert.Equal(t, []string{"prepare_script", "get_sources", "build_script", "after_script", "cleanup_file_variables"},
		res.RunStages())
	assert.Equal(t, "cleanup", res.Stages[len(res.Stages)-1].Kind)
	assert.True(t, res.Call("build_script").Terminated)
	assert.Contains(t, res.Log, "WARNING: script canceled externally (UI, API)\n")
	assert.Contains(t, res.Log, "after status=canceled\n")
	assert.Equal(t, "canceled", f.env(t, "run-after_script")["CUSTOM_ENV_CI_JOB_STATUS"])
	assert.Equal(t, "canceled", f.env(t, "cleanup")["CUSTOM_ENV_CI_JOB_STATUS"])
	assert.True(t, strings.HasSuffix(res.Log, "ERROR: Job failed: canceled\n"), res.Log)
	assert.Empty(t, ProcessesInGroup(res.Call("build_script").Pgid))
	assert.Empty(t, ProcessesWithMarker(marker))
}

func TestRunWithCancel(t *testing.T) {
	f := newFake(t)
	res, err := f.cfg.RunWithCancel(context.Background(), Job{
		Script:      []string{"sleep 30"},
		AfterScript: []string{"echo after status=$CI_JOB_STATUS"},
	}, 700*time.Millisecond)
	require.NoError(t, err)
	assert.Equal(t, ReasonUnknownFailure, res.FailureReason)
	assert.Contains(t, res.Log, "after status=canceled\n")
}

func TestCancelDuringPrepareAbortsJob(t *testing.T) {
	f := newFake(t)
	ch := make(chan struct{})
	time.AfterFunc(300*time.Millisecond, func() { close(ch) })
	res, err := f.cfg.Run(context.Background(), Job{
		Variables: map[string]string{"FAKE_PREPARE_SLEEP": "30"},
		Script:    []string{"echo hi"},
		Cancel:    ch,
	})
	require.NoError(t, err)
	t.Log(res.Log)
	assert.Equal(t, []string{"config", "prepare", "cleanup"}, kinds(res))
	assert.Equal(t, ReasonUnknownFailure, res.FailureReason)
	assert.Contains(t, res.Log, "ERROR: Job failed: canceled\n")
	assert.NotContains(t, res.Log, "script canceled externally")
}

func TestDriverIgnoringTermIsKilled(t *testing.T) {
	f := newFake(t)
	f.cfg.GracefulKillTimeout = 800 * time.Millisecond
	marker := fmt.Sprintf("rd-ignore-%d", time.Now().UnixNano())
	res, err := f.cfg.Run(context.Background(), Job{
		Timeout:   time.Second,
		Variables: map[string]string{"FAKE_IGNORE_TERM": "build_script", "RD_MARKER": marker},
		Script:    []string{"sleep 30"},
	})
	require.NoError(t, err)
	build := res.Call("build_script")
	require.NotNil(t, build)
	assert.True(t, build.Terminated)
	assert.True(t, build.ForceKilled)
	assert.False(t, build.GaveUp)
	assert.True(t, build.Signaled)
	assert.Equal(t, -1, build.ExitCode)
	assert.Equal(t, ReasonJobExecutionTimeout, res.FailureReason)
	assert.Equal(t, "cleanup", res.Stages[len(res.Stages)-1].Kind)
	assert.Empty(t, ProcessesInGroup(build.Pgid))
	assert.Empty(t, ProcessesWithMarker(marker))
}

func TestCleanupFailureDoesNotChangeResult(t *testing.T) {
	f := newFake(t)
	res, err := f.cfg.Run(context.Background(), Job{
		Variables: map[string]string{"FAKE_CLEANUP_EXIT": "2"},
		Script:    []string{"echo hi"},
	})
	require.NoError(t, err)
	assert.Equal(t, StateSuccess, res.State)
	assert.Equal(t, 2, res.Stages[len(res.Stages)-1].ExitCode)
	assert.Contains(t, res.Log, "WARNING: Cleanup script failed: exit status 2")
	assert.NotContains(t, res.Log, "cleanup on")
}

func TestPrepareScriptFailureSkipsLaterStages(t *testing.T) {
	f := newFake(t)
	res, err := f.cfg.Run(context.Background(), Job{
		Variables: map[string]string{"FAKE_RAW_EXIT": "prepare_script", "FAKE_SHELL": "false"},
		Script:    []string{"echo hi"},
	})
	require.NoError(t, err)
	assert.Equal(t, []string{"prepare_script"}, res.RunStages())
	assert.Equal(t, ReasonScriptFailure, res.FailureReason)
	assert.Contains(t, res.Log, "ERROR: Job failed: prepare environment: exit status 1.")
}

func TestScriptsRunUnderBusybox(t *testing.T) {
	bb := testenv.RequireBinary(t, "busybox")
	f := newFake(t)
	shell := bb + " sh"
	res, err := f.cfg.Run(context.Background(), Job{
		Variables:   map[string]string{"FAKE_SHELL": shell, "QUOTED": `it's "quoted" $HOME`},
		Script:      []string{`echo "q=$QUOTED"`, "echo multi\necho line"},
		AfterScript: []string{"echo after"},
	})
	require.NoError(t, err)
	t.Log(res.Log)
	assert.Equal(t, StateSuccess, res.State)
	assert.Contains(t, res.Log, `q=it's "quoted" $HOME`+"\n")
	assert.Contains(t, res.Log, "$ echo multi # collapsed multi-line command\nmulti\nline\n")

	for _, script := range []string{"exit 7", "false | true"} {
		res, err = f.cfg.Run(context.Background(), Job{
			Variables: map[string]string{"FAKE_SHELL": shell},
			Script:    []string{script, "echo never"},
		})
		require.NoError(t, err)
		assert.Equal(t, ReasonScriptFailure, res.FailureReason, script)
		assert.NotContains(t, res.Log, "\nnever\n", script)
	}
}

func TestGeneratedScriptTermTrap(t *testing.T) {
	// The runner's script turns SIGTERM into exit 1 (trap 'exit 1' TERM).
	sc := jobscript.Context{ProjectDir: t.TempDir(), Steps: []Step{{Name: "script", Script: []string{"echo ready", "sh -c 'echo blocking; exec sleep 30'"}}}}
	script, ok, err := sc.StageScript("step_script", "bash")
	require.NoError(t, err)
	require.True(t, ok)
	p := filepath.Join(t.TempDir(), "script")
	require.NoError(t, os.WriteFile(p, []byte(script), 0o700))
	for _, shell := range [][]string{{"bash"}, {"busybox", "sh"}} {
		// Under the test command a missing shell fails the test.
		shell[0] = testenv.RequireBinary(t, shell[0])
		cmd := exec.Command(shell[0], append(shell[1:], p)...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		out, err := cmd.StdoutPipe()
		require.NoError(t, err)
		require.NoError(t, cmd.Start())
		// Wait until the blocking command itself says it runs (it then
		// is sleep, in the script's process group): a SIGTERM sent
		// earlier could reach the shell before sleep exists.
		var got []byte
		buf := make([]byte, 256)
		for !strings.Contains(string(got), "blocking\n") {
			n, err := out.Read(buf)
			got = append(got, buf[:n]...)
			require.NoError(t, err, "output so far: %s", got)
		}
		assert.Contains(t, string(got), "$ echo ready")
		require.NoError(t, syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM))
		err = cmd.Wait()
		var ee *exec.ExitError
		require.ErrorAs(t, err, &ee, shell[0])
		assert.Equal(t, 1, ee.ExitCode(), shell[0])
	}
}

func TestRunAsUnprivilegedUser(t *testing.T) {
	testenv.RequireRoot(t)
	u, err := user.Lookup("nobody")
	if err != nil {
		testenv.Missing(t, "no user nobody: %v", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	root, err := os.MkdirTemp("", "rd-user")
	require.NoError(t, err)
	t.Cleanup(func() { _ = os.RemoveAll(root) })
	require.NoError(t, os.Chmod(root, 0o777))
	f := newFakeIn(t, root)
	require.NoError(t, os.Chmod(f.rec, 0o777))
	f.cfg.Credential = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	f.cfg.KeepTemp = true
	res, err := f.cfg.Run(context.Background(), Job{Script: []string{"id -u"}})
	require.NoError(t, err)
	assert.Equal(t, StateSuccess, res.State, res.Log)
	assert.Contains(t, res.Log, "\n"+u.Uid+"\n")
	assert.Equal(t, u.Uid+"\n", f.file(t, "config.uid"))
	assert.Equal(t, u.Uid+"\n", f.file(t, "cleanup.uid"))
	st, err := os.Stat(res.TempDir)
	require.NoError(t, err)
	assert.Equal(t, uint32(uid), st.Sys().(*syscall.Stat_t).Uid)
}

func TestResponseJSONDefaults(t *testing.T) {
	b, err := Job{}.ResponseJSON()
	require.NoError(t, err)
	var p struct {
		ID         int64  `json:"id"`
		Token      string `json:"token"`
		RunnerInfo struct {
			Timeout int `json:"timeout"`
		} `json:"runner_info"`
		Steps []struct {
			Name string `json:"name"`
		} `json:"steps"`
	}
	require.NoError(t, json.Unmarshal(b, &p))
	assert.EqualValues(t, 1, p.ID)
	assert.Equal(t, DefaultToken, p.Token)
	assert.Equal(t, 3600, p.RunnerInfo.Timeout)
	require.Len(t, p.Steps, 1)
	assert.Equal(t, "script", p.Steps[0].Name)
}

func TestProcessScanners(t *testing.T) {
	marker := fmt.Sprintf("rd-scan-%d", time.Now().UnixNano())
	cmd := exec.Command("sleep", "30")
	cmd.Env = append(os.Environ(), "RD_MARKER="+marker)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	require.NoError(t, cmd.Start())
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	assert.Equal(t, []int{cmd.Process.Pid}, ProcessesInGroup(cmd.Process.Pid))
	assert.Equal(t, []int{cmd.Process.Pid}, ProcessesWithMarker(marker))
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	assert.Empty(t, ProcessesInGroup(cmd.Process.Pid))
	assert.Empty(t, ProcessesWithMarker(marker))
}

func TestGiveUpAfterForceKillTimeout(t *testing.T) {
	testenv.RequireBinary(t, "setsid")
	f := newFake(t)
	f.cfg.GracefulKillTimeout = 300 * time.Millisecond
	f.cfg.ForceKillTimeout = 500 * time.Millisecond
	marker := fmt.Sprintf("rd-escape-%d", time.Now().UnixNano())
	t.Cleanup(func() {
		for _, pid := range ProcessesWithMarker(marker) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	// A process that left the group but holds the output pipe keeps the
	// call from ending: SIGTERM, SIGKILL, then the double gives up.
	res, err := f.cfg.Run(context.Background(), Job{
		Timeout:   time.Second,
		Variables: map[string]string{"RD_MARKER": marker},
		Script:    []string{"setsid sleep 20 &", "sleep 30"},
	})
	require.NoError(t, err)
	build := res.Call("build_script")
	require.NotNil(t, build)
	assert.True(t, build.Terminated)
	assert.True(t, build.ForceKilled)
	assert.True(t, build.GaveUp)
	assert.Equal(t, ReasonJobExecutionTimeout, res.FailureReason)
	assert.Equal(t, "cleanup", res.Stages[len(res.Stages)-1].Kind)
	assert.NotEmpty(t, ProcessesWithMarker(marker), "the escaped process is still there")
}

func TestStageCallPeakRSS(t *testing.T) {
	f := newFake(t)
	// During build_script the driver itself holds 40 MiB; the script's
	// own shell holds as much during after_script, which is not the
	// driver's memory.
	hold := `s=$(head -c 41943040 /dev/zero | tr '\0' x); echo "held ${#s}"`
	res, err := f.cfg.Run(context.Background(), Job{
		Variables:   map[string]string{"FAKE_HOLD_STAGE": "build_script"},
		Script:      []string{"echo small"},
		AfterScript: []string{hold},
	})
	require.NoError(t, err)
	require.True(t, res.Succeeded(), res.Log)
	assert.Contains(t, res.Log, "held 41943040")
	build, after := res.Call("build_script"), res.Call("after_script")
	require.NotNil(t, build)
	require.NotNil(t, after)
	assert.Greater(t, build.PeakRSS, int64(40<<20))
	assert.Greater(t, after.PeakRSS, int64(0))
	assert.Less(t, after.PeakRSS, int64(20<<20), "a descendant's memory is not the driver's")

	v, ok := readVmHWM("/proc/self/status")
	assert.True(t, ok)
	assert.Greater(t, v, int64(0))
}
