package runnerdouble

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"gitlab.com/gitlab-org/gitlab-runner/executors/custom/api"
)

// Run runs one job through the driver the way gitlab-runner's custom
// executor does and returns its result. The error is non-nil only for faults
// of the double itself (bad Config, temp dir not writable, ...), never for a
// failed job.
func (c Config) Run(ctx context.Context, job Job) (*Result, error) {
	return c.run(ctx, job, 0)
}

// RunWithCancel is Run with a cancel from the UI/API cancelAfter after the
// job started: before the user script stages this aborts the job (only
// cleanup_exec follows); during them the running stage is terminated, then
// after_script (CI_JOB_STATUS=canceled), cleanup_file_variables and
// cleanup_exec still run. The result is failed/unknown_failure, exit code 0.
func (c Config) RunWithCancel(ctx context.Context, job Job, cancelAfter time.Duration) (*Result, error) {
	return c.run(ctx, job, cancelAfter)
}

// run holds the state of one job.
type run struct {
	cfg Config
	job Job

	log       *jobLog
	runnerLog *syncBuffer

	mu    sync.Mutex
	calls []StageCall

	cancelMu        sync.Mutex
	cancelFn        context.CancelFunc
	cancelRequested bool

	// per prepare attempt
	tmp          string
	responseFile string
	exitCodeFile string
	jobEnv       map[string]string
	configOut    *api.ConfigExecOutput
	driverInfo   *api.DriverInfo
	shell        string

	execBuildsDir string // executor's builds_dir: [[runners]] value or config_exec's
	execCacheDir  string
	shared        bool

	// build state (kept across prepare attempts, like common.Build)
	hostname   string
	buildsDir  string // Build.RootDir, set by StartBuild
	cacheDir   string
	projectDir string
	jobStatus  string
	tempDirs   []string
	// failed is set once the user scripts are over and failed (the
	// archive and upload stages pick their _on_failure variants).
	failed bool
}

func (r *run) addCall(c StageCall) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, c)
}

// setCancel installs what a cancel request cancels (the runner's
// trace.SetCancelFunc); a cancel requested earlier fires at once.
func (r *run) setCancel(fn context.CancelFunc) {
	r.cancelMu.Lock()
	defer r.cancelMu.Unlock()
	r.cancelFn = fn
	if r.cancelRequested {
		fn()
	}
}

func (r *run) requestCancel() {
	r.cancelMu.Lock()
	defer r.cancelMu.Unlock()
	r.cancelRequested = true
	if r.cancelFn != nil {
		r.cancelFn()
	}
}

func (r *run) logln(args ...any) {
	r.log.println(strings.TrimSuffix(fmt.Sprintln(args...), "\n"))
}

func (r *run) warnln(args ...any) { r.logln(append([]any{"WARNING:"}, args...)...) }

func (r *run) errorln(args ...any) { r.logln(append([]any{"ERROR:"}, args...)...) }

func (r *run) runnerLogf(format string, args ...any) {
	_, _ = fmt.Fprintf(r.runnerLog, format+"\n", args...)
}

func (c Config) run(ctx context.Context, job Job, cancelAfter time.Duration) (*Result, error) {
	if c.Driver == "" {
		return nil, errors.New("runnerdouble: Config.Driver is empty")
	}
	c = c.withDefaults()
	job = job.withDefaults()
	start := time.Now()

	r := &run{cfg: c, job: job, runnerLog: &syncBuffer{}, jobStatus: "running"}
	var masks []string
	for _, v := range job.PayloadVariables() {
		if v.Masked {
			masks = append(masks, v.Value)
		}
	}
	r.log = newJobLog(c.LiveLog, masks, job.CancelOnLog, r.requestCancel)

	if cancelAfter > 0 {
		t := time.AfterFunc(cancelAfter, r.requestCancel)
		defer t.Stop()
	}
	if job.Cancel != nil {
		stop := make(chan struct{})
		defer close(stop)
		go func() {
			select {
			case <-job.Cancel:
				r.requestCancel()
			case <-stop:
			}
		}()
	}

	err, fault := r.runBuild(ctx)
	if fault != nil {
		return nil, fault
	}

	res := &Result{
		RunnerLog:    r.runnerLog.String(),
		ConfigOutput: r.configOut,
		BuildsDir:    r.buildsDir,
		CacheDir:     r.cacheDir,
		ProjectDir:   r.projectDir,
		TempDir:      r.tmp,
		TempDirs:     r.tempDirs,
	}
	r.finish(res, err)
	res.Log, res.RawLog = r.log.strings()
	res.RunnerLog = r.runnerLog.String()
	r.mu.Lock()
	res.Stages = append([]StageCall(nil), r.calls...)
	r.mu.Unlock()
	res.Duration = time.Since(start)
	return res, nil
}

// finish is the runner's setTraceStatus: the final log line and the state.
func (r *run) finish(res *Result, err error) {
	if err == nil {
		r.logln("Job succeeded")
		res.State = StateSuccess
		return
	}
	res.State = StateFailed
	res.Error = err.Error()
	var be *buildError
	if errors.As(err, &be) {
		res.InternalFailureReason = be.reason
		res.ExitCode = be.exitCode
		if be.reason == ReasonRunnerSystemFailure {
			r.errorln("Job failed (system failure):", err)
		} else {
			r.errorln("Job failed:", err)
		}
		res.FailureReason = mapFailureReason(be.reason)
		return
	}
	res.InternalFailureReason = ReasonRunnerSystemFailure
	res.FailureReason = ReasonRunnerSystemFailure
	r.errorln("Job failed (system failure):", err)
}

// mapFailureReason is the runner's failureReasonMapper for a GitLab whose
// features.failure_reasons is empty (only the always-supported reasons).
func mapFailureReason(reason string) string {
	switch reason {
	case "":
		return ReasonScriptFailure
	case ReasonScriptFailure, ReasonRunnerSystemFailure, ReasonJobExecutionTimeout:
		return reason
	case InternalReasonConfigurationError:
		return ReasonScriptFailure
	case "image_pull_failure", "runner_external_dependency_failure":
		return ReasonRunnerSystemFailure
	}
	return ReasonUnknownFailure
}

// handleError is the runner's runtimeStateAndError for a context error.
func (r *run) handleError(err error) error {
	_, e := r.runtimeStateAndError(err)
	return e
}

func (r *run) runtimeStateAndError(err error) (string, error) {
	switch {
	case errors.Is(err, context.Canceled), errors.Is(err, errJobCanceled):
		return "canceled", &buildError{inner: errJobCanceled, reason: InternalReasonJobCanceled}
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, errJobScriptTimeout):
		return "timedout", &buildError{
			inner:  fmt.Errorf("execution took longer than %v seconds", r.job.Timeout),
			reason: ReasonJobExecutionTimeout,
		}
	case err == nil:
		return "success", nil
	default:
		return "failed", err
	}
}

// runBuild is common.Build.Run: header, prepare with retries, the stages,
// cleanup_exec. It returns the job error and a fault of the double.
func (r *run) runBuild(parent context.Context) (jobErr error, fault error) {
	r.logln(fmt.Sprintf("Running with gitlab-runner %s (%s)", RunnerVersion, RunnerRevision))
	r.logln(fmt.Sprintf("  on %s %s, system ID: s_0123456789ab", r.cfg.RunnerName, r.job.RunnerShortToken))

	buildCtx, buildCancel := context.WithCancel(parent)
	defer buildCancel()
	ctx, cancel := context.WithTimeout(buildCtx, r.job.Timeout)
	defer cancel()
	// Until the user scripts start, a cancel aborts the whole build.
	r.setCancel(buildCancel)

	r.logln(`Preparing the "custom" executor`)
	err, fault := r.retryCreateExecutor(ctx)
	if fault != nil || err != nil {
		return err, fault
	}

	err, fault = r.executeScript(ctx)
	if fault == nil && ctx.Err() != nil {
		err = r.handleError(context.Cause(ctx))
	}
	r.cleanup()
	return err, fault
}

// retryCreateExecutor is common.Build.retryCreateExecutor.
func (r *run) retryCreateExecutor(ctx context.Context) (error, error) {
	var err error
	for range PrepareAttempts {
		var fault error
		err, fault = r.prepare(ctx)
		if fault != nil {
			r.cleanup()
			return nil, fault
		}
		if err == nil {
			return nil, nil
		}
		r.cleanup()
		var be *buildError
		if errors.As(err, &be) {
			return err, nil
		}
		if ctx.Err() != nil {
			return r.handleError(context.Cause(ctx)), nil
		}
		r.errorln("Preparation failed:", err)
		r.logln("Will be retried in", r.cfg.PrepareRetryInterval, "...")
		t := time.NewTimer(r.cfg.PrepareRetryInterval)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return r.handleError(context.Cause(ctx)), nil
		}
	}
	return err, nil
}

// prepare is the custom executor's Prepare: temp dir, response.json,
// config_exec, startup message, StartBuild, prepare_exec.
func (r *run) prepare(ctx context.Context) (error, error) {
	tmp, err := os.MkdirTemp(r.cfg.TempRoot, "custom-executor")
	if err != nil {
		return nil, fmt.Errorf("runnerdouble: %w", err)
	}
	r.tmp = tmp
	r.tempDirs = append(r.tempDirs, tmp)
	r.responseFile = filepath.Join(tmp, "response.json")
	r.exitCodeFile = filepath.Join(tmp, "build_exit_code")
	r.jobEnv = nil
	r.configOut = nil
	r.driverInfo = nil
	r.shell = "bash"
	r.execBuildsDir = r.cfg.BuildsDir
	r.execCacheDir = r.cfg.CacheDir
	r.shared = false
	if err := r.chown(tmp); err != nil {
		return nil, err
	}
	body, err := r.job.ResponseJSON()
	if err != nil {
		return nil, fmt.Errorf("runnerdouble: encoding job payload: %w", err)
	}
	if err := os.WriteFile(r.responseFile, body, 0o600); err != nil {
		return nil, fmt.Errorf("runnerdouble: %w", err)
	}
	if err := r.chown(r.responseFile); err != nil {
		return nil, err
	}

	// config_exec
	cctx, ccancel := context.WithTimeout(ctx, r.cfg.ConfigExecTimeout)
	var stdout bytes.Buffer
	err = r.exec(cctx, callSpec{
		kind:   KindConfig,
		args:   r.cfg.ConfigArgs,
		env:    r.env(false),
		out:    r.log,
		stdout: &stdout,
	})
	ccancel()
	r.log.flush()
	if err != nil {
		return err, nil
	}
	if stdout.Len() > 0 {
		out := new(api.ConfigExecOutput)
		if err := json.Unmarshal(stdout.Bytes(), out); err != nil {
			return fmt.Errorf("error while parsing JSON output: %w", err), nil
		}
		r.configOut = out
		r.inject(out)
	}
	r.logStartupMessage()

	// StartBuild
	if r.execBuildsDir == "" {
		return &buildError{inner: errors.New("the builds_dir is not configured"), reason: InternalReasonConfigurationError}, nil
	}
	if r.execCacheDir == "" {
		return &buildError{inner: errors.New("the cache_dir is not configured"), reason: InternalReasonConfigurationError}, nil
	}
	dir := r.job.ProjectFullPath
	if r.shared {
		dir = path.Join(r.job.RunnerShortToken, strconv.Itoa(r.job.ConcurrentID), dir)
	}
	r.buildsDir = r.execBuildsDir
	r.cacheDir = r.execCacheDir
	r.projectDir = path.Join(r.buildsDir, dir)
	if r.shell != "bash" && r.shell != "sh" {
		return fmt.Errorf("shell %s not found", r.shell), nil
	}

	// prepare_exec
	pctx, pcancel := context.WithTimeout(ctx, r.cfg.PrepareExecTimeout)
	defer pcancel()
	err = r.exec(pctx, callSpec{kind: KindPrepare, args: r.cfg.PrepareArgs, env: r.env(true), out: r.log})
	r.log.flush()
	return err, nil
}

// inject is ConfigExecOutput.InjectInto.
func (r *run) inject(out *api.ConfigExecOutput) {
	if out.Hostname != nil {
		r.hostname = *out.Hostname
	}
	if out.BuildsDir != nil {
		r.execBuildsDir = *out.BuildsDir
	}
	if out.CacheDir != nil {
		r.execCacheDir = *out.CacheDir
	}
	if out.BuildsDirIsShared != nil {
		r.shared = *out.BuildsDirIsShared
	}
	r.driverInfo = out.Driver
	if out.JobEnv != nil {
		r.jobEnv = *out.JobEnv
	}
	if out.Shell != nil {
		r.shell = *out.Shell
	}
}

func (r *run) logStartupMessage() {
	info := r.driverInfo
	switch {
	case info == nil || info.Name == nil:
		r.logln("Using Custom executor...")
	case info.Version == nil:
		r.logln(fmt.Sprintf("Using Custom executor with driver %s...", *info.Name))
	default:
		r.logln(fmt.Sprintf("Using Custom executor with driver %s %s...", *info.Name, *info.Version))
	}
}

// cleanup is the custom executor's Cleanup: cleanup_exec with a fresh
// context, output to the runner log, then the temp dir removed.
func (r *run) cleanup() {
	if r.tmp == "" {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), r.cfg.CleanupExecTimeout)
	defer cancel()
	err := r.exec(ctx, callSpec{kind: KindCleanup, args: r.cfg.CleanupArgs, env: r.env(true), out: r.runnerLog})
	if err != nil {
		r.warnln("Cleanup script failed:", err)
		r.runnerLogf("WARNING: Cleanup script failed: %v", err)
	}
	if !r.cfg.KeepTemp {
		_ = os.RemoveAll(r.tmp)
	}
}

func (r *run) chown(p string) error {
	if r.cfg.Credential == nil {
		return nil
	}
	if err := os.Chown(p, int(r.cfg.Credential.Uid), int(r.cfg.Credential.Gid)); err != nil {
		return fmt.Errorf("runnerdouble: %w", err)
	}
	return nil
}

// variables is common.Build.GetAllVariables (a fixed subset of FF_* first,
// then runner variables, the payload variables and the trailing runner ones).
func (r *run) variables() []Variable {
	pub := func(k, v string) Variable { return Variable{Key: k, Value: v, Public: true} }
	payloadVars := r.job.PayloadVariables()
	ff := map[string]string{}
	for _, f := range featureFlags {
		ff[f] = strconv.FormatBool(featureFlagDefaults[f])
	}
	var jobVars []Variable
	for _, v := range payloadVars {
		if isFeatureFlag(v.Key) {
			if b, err := strconv.ParseBool(v.Value); err == nil {
				ff[v.Key] = strconv.FormatBool(b)
			}
			continue
		}
		jobVars = append(jobVars, v)
	}
	var vars []Variable
	for _, f := range featureFlags {
		vars = append(vars, pub(f, ff[f]))
	}
	if r.job.Image != "" {
		vars = append(vars, pub("CI_JOB_IMAGE", r.job.Image))
	}
	vars = append(vars, pub("CI_RUNNER_SHORT_TOKEN", r.job.RunnerShortToken))
	for _, e := range r.cfg.Environment {
		if k, v, ok := strings.Cut(e, "="); ok {
			vars = append(vars, Variable{Key: k, Value: v})
		}
	}
	projectDir := r.projectDir
	buildsDir := r.buildsDir
	vars = append(vars,
		pub("CI_BUILDS_DIR", buildsDir),
		pub("CI_PROJECT_DIR", projectDir),
		pub("CI_CONCURRENT_ID", strconv.Itoa(r.job.ConcurrentID)),
		pub("CI_CONCURRENT_PROJECT_ID", strconv.Itoa(r.job.ConcurrentID)),
		pub("CI_SERVER", "yes"),
		pub("CI_JOB_STATUS", r.jobStatus),
		pub("CI_JOB_TIMEOUT", strconv.Itoa(timeoutSeconds(r.job))),
	)
	vars = append(vars, jobVars...)
	vars = append(vars,
		pub("CI_SHARED_ENVIRONMENT", "true"),
		pub("CI_RUNNER_VERSION", RunnerVersion),
		pub("CI_RUNNER_REVISION", RunnerRevision),
		pub("CI_RUNNER_EXECUTABLE_ARCH", runtime.GOOS+"/"+runtime.GOARCH),
		pub("RUNNER_TEMP_PROJECT_DIR", projectDir+".tmp"),
	)
	return vars
}

// env is the environment of a driver call (§5.1): base env, TMPDIR, the
// exit-code and file variables, job_env (withJobEnv), CUSTOM_ENV_*.
func (r *run) env(withJobEnv bool) []string {
	env := append([]string(nil), r.cfg.BaseEnv...)
	env = append(env,
		"TMPDIR="+r.tmp,
		"BUILD_FAILURE_EXIT_CODE=1",
		"SYSTEM_FAILURE_EXIT_CODE=2",
		"BUILD_EXIT_CODE_FILE="+r.exitCodeFile,
		"JOB_RESPONSE_FILE="+r.responseFile,
	)
	if withJobEnv {
		for _, k := range sortedKeys(r.jobEnv) {
			env = append(env, k+"="+r.jobEnv[k])
		}
	}
	for _, v := range r.variables() {
		env = append(env, "CUSTOM_ENV_"+v.Key+"="+v.Value)
	}
	return append(env, "CUSTOM_ENV_CI_JOB_SERVICES="+r.job.servicesEnv())
}
