package runnerdouble

import (
	"io"
	"os"
	"strings"
	"syscall"
	"time"

	"gitlab.com/gitlab-org/gitlab-runner/executors/custom/api"

	"github.com/ci-exec/ci-exec/internal/jobscript"
)

// Values the double reports as the runner's own identity.
const (
	// RunnerVersion is the gitlab-runner version the double imitates (CI_RUNNER_VERSION).
	RunnerVersion = jobscript.RunnerVersion
	// RunnerRevision is the gitlab-runner revision the double imitates (CI_RUNNER_REVISION).
	RunnerRevision = "fc1f1862"
	// ServerURL is the fake GitLab URL given as CI_SERVER_URL; nothing listens there.
	ServerURL = "http://127.0.0.1:1"
)

// Defaults applied to a zero Job or Config.
const (
	// DefaultJobID is the job ID used when Job.ID is 0.
	DefaultJobID = 1
	// DefaultJobName is CI_JOB_NAME when Job.Name is empty.
	DefaultJobName = "test"
	// DefaultToken is CI_JOB_TOKEN when Job.Token is empty.
	DefaultToken = "glcbt-runnerdouble-jobtoken"
	// DefaultProjectFullPath is the project path when Job.ProjectFullPath is empty.
	DefaultProjectFullPath = "demo-group/demo"
	// DefaultRunnerShortToken is CI_RUNNER_SHORT_TOKEN when Job.RunnerShortToken is empty.
	DefaultRunnerShortToken = "t3stt0k3n"
	// DefaultGitStrategy is GIT_STRATEGY when Job.GitStrategy is empty.
	DefaultGitStrategy = "none"
	// DefaultJobTimeout is the job timeout when Job.Timeout is 0.
	DefaultJobTimeout = time.Hour
	// DefaultGracefulKillTimeout is used when Config.GracefulKillTimeout is 0
	// (the runner's own default is 10 min; tests want seconds).
	DefaultGracefulKillTimeout = 3 * time.Second
	// DefaultForceKillTimeout is used when Config.ForceKillTimeout is 0.
	DefaultForceKillTimeout = 3 * time.Second
	// DefaultPrepareRetryInterval is the runner's PreparationRetryInterval.
	DefaultPrepareRetryInterval = 3 * time.Second
	// PrepareAttempts is the runner's PreparationRetries.
	PrepareAttempts = 3
	// DefaultExecTimeout is the runner's config/prepare/cleanup_exec_timeout default.
	DefaultExecTimeout = time.Hour
	// DefaultAfterScriptTimeout is the runner's RUNNER_AFTER_SCRIPT_TIMEOUT default.
	DefaultAfterScriptTimeout = 5 * time.Minute
)

// Job states and failure reasons as reported to GitLab.
const (
	// StateSuccess is Result.State of a job that succeeded.
	StateSuccess = "success"
	// StateFailed is Result.State of a job that failed, timed out or was canceled.
	StateFailed = "failed"

	// ReasonScriptFailure is the failure reason of a build error (driver exit $BUILD_FAILURE_EXIT_CODE).
	ReasonScriptFailure = "script_failure"
	// ReasonRunnerSystemFailure is the failure reason of a system or unknown failure.
	ReasonRunnerSystemFailure = "runner_system_failure"
	// ReasonJobExecutionTimeout is the failure reason of a job that hit its timeout.
	ReasonJobExecutionTimeout = "job_execution_timeout"
	// ReasonUnknownFailure is what GitLab receives for a canceled job (job_canceled is internal).
	ReasonUnknownFailure = "unknown_failure"

	// InternalReasonConfigurationError is the runner's internal reason for e.g. a missing builds_dir
	// (reported as script_failure).
	InternalReasonConfigurationError = "runner_configuration_error"
	// InternalReasonJobCanceled is the runner's internal reason for a canceled job
	// (reported as unknown_failure).
	InternalReasonJobCanceled = "job_canceled"
)

// Call kinds recorded in StageCall.Kind.
const (
	// KindConfig is a config_exec call.
	KindConfig = "config"
	// KindPrepare is a prepare_exec call.
	KindPrepare = "prepare"
	// KindRun is a run_exec call (StageCall.Stage holds the stage name).
	KindRun = "run"
	// KindCleanup is a cleanup_exec call.
	KindCleanup = "cleanup"
)

// Step, Cache, Artifacts and Dependency are the job's steps, cache:,
// artifacts: and dependencies, as the stage scripts (internal/jobscript)
// take them.
type (
	Step       = jobscript.Step
	Cache      = jobscript.Cache
	Artifacts  = jobscript.Artifacts
	Dependency = jobscript.Dependency
)

// Job describes the job the double "receives from GitLab".
type Job struct {
	// ID is the job ID (CI_JOB_ID, payload "id"); default 1.
	ID int64
	// Name is the job name (CI_JOB_NAME, job_info.name); default "test".
	Name string
	// Token is CI_JOB_TOKEN (masked) and the payload "token"; default DefaultToken.
	Token string
	// ProjectFullPath is CI_PROJECT_PATH and job_info.project_full_path; default "demo-group/demo".
	ProjectFullPath string
	// Image is CI_JOB_IMAGE and the payload image.name; "" means no image.
	Image string
	// Variables are user/project variables (payload "variables", CUSTOM_ENV_<KEY>, script exports).
	Variables map[string]string
	// MaskedVariables are like Variables but "masked": true (masked in Result.Log, passed in clear).
	MaskedVariables map[string]string
	// Script is the "script" step (before_script+script), run as stage build_script.
	Script []string
	// AfterScript is the optional "after_script" step.
	AfterScript []string
	// ExtraSteps are extra stage names run after build_script, e.g. "step_release"
	// or "step_future_thing"; each one's body echoes its stage name.
	ExtraSteps []string
	// Steps, when not empty, replaces Script, AfterScript and ExtraSteps with a full step list.
	Steps []Step
	// Timeout is the job timeout (runner_info.timeout, CI_JOB_TIMEOUT); 0 means 1h.
	Timeout time.Duration
	// Registry is CI_REGISTRY (with CI_REGISTRY_USER/PASSWORD/IMAGE); "" leaves them out.
	Registry string
	// ConcurrentID is CI_CONCURRENT_ID and CI_CONCURRENT_PROJECT_ID.
	ConcurrentID int
	// RunnerShortToken is CI_RUNNER_SHORT_TOKEN; default "t3stt0k3n".
	RunnerShortToken string
	// GitStrategy is GIT_STRATEGY: "none" (default), "empty", or "clone"/"fetch" with RepoURL.
	GitStrategy string
	// RepoURL is git_info.repo_url (and CI_REPOSITORY_URL); needed only
	// for GIT_STRATEGY clone/fetch. An http(s) URL without user info gets
	// gitlab-ci-token and the job token in it, as GitLab sends it; default
	// ServerURL/<ProjectFullPath>.git.
	RepoURL string
	// Sha is git_info.sha and CI_COMMIT_SHA, the commit get_sources checks
	// out; default a fake one (a real fetch then fails at the checkout).
	Sha string
	// Refspecs are git_info.refspecs; nil means
	// "+refs/heads/main:refs/remotes/origin/main".
	Refspecs []string
	// Cache, when set, is the job's cache (the runner's local cache, no
	// cache server): restore_cache before the user steps and archive_cache
	// or archive_cache_on_failure after them, through the helper's
	// cache-extractor and cache-archiver as the runner writes them.
	Cache *Cache
	// Artifacts, when set, are uploaded after the user steps
	// (upload_artifacts_on_success or _on_failure) with
	// "gitlab-runner artifacts-uploader --url ... --token <job token> --id ...",
	// the job token on the helper's command line as the real runner puts it.
	Artifacts *Artifacts
	// Dependencies are earlier jobs whose artifacts download_artifacts
	// fetches with "gitlab-runner artifacts-downloader --token ...".
	Dependencies []Dependency
	// CancelOnLog, when set, cancels the job (UI/API cancel semantics) as soon
	// as a job log line that is not a "$ command" echo contains this string.
	CancelOnLog string
	// Cancel, when not nil, cancels the job (UI/API cancel semantics) when it
	// is closed or receives a value.
	Cancel <-chan struct{}
	// Services are the job's services: the payload's "services" and
	// CUSTOM_ENV_CI_JOB_SERVICES, as the runner builds them.
	Services []Service
}

// Service is one of the job's `services:`.
type Service struct {
	Name       string
	Alias      string
	Entrypoint []string
	Command    []string
	// Variables are the service's own variables (already expanded).
	Variables map[string]string
	// Ports are the payload's ports (not in CI_JOB_SERVICES).
	Ports []int
}

// Config describes the runner side: the driver and the [runners.custom] settings.
type Config struct {
	// Driver is the path of the driver binary used for all four executables.
	Driver string
	// ConfigArgs are config_args, e.g. {"--config", path, "config"}.
	ConfigArgs []string
	// PrepareArgs are prepare_args.
	PrepareArgs []string
	// RunArgs are run_args; the script path and stage name are appended.
	RunArgs []string
	// CleanupArgs are cleanup_args.
	CleanupArgs []string
	// BaseEnv is what the runner process itself had in its environment;
	// nil means PATH, HOME, USER and LANG taken from os.Environ.
	BaseEnv []string
	// Environment is the [[runners]] environment ("KEY=VALUE"), added to the job variables.
	Environment []string
	// GracefulKillTimeout is graceful_kill_timeout; default 3s.
	GracefulKillTimeout time.Duration
	// ForceKillTimeout is force_kill_timeout; default 3s.
	ForceKillTimeout time.Duration
	// PrepareRetryInterval is the pause between prepare attempts; default 3s.
	PrepareRetryInterval time.Duration
	// ConfigExecTimeout is config_exec_timeout; default 1h.
	ConfigExecTimeout time.Duration
	// PrepareExecTimeout is prepare_exec_timeout; default 1h.
	PrepareExecTimeout time.Duration
	// CleanupExecTimeout is cleanup_exec_timeout; default 1h.
	CleanupExecTimeout time.Duration
	// AfterScriptTimeout is RUNNER_AFTER_SCRIPT_TIMEOUT; default 5m.
	AfterScriptTimeout time.Duration
	// BuildsDir is the [[runners]] builds_dir used when config_exec gives none.
	BuildsDir string
	// CacheDir is the [[runners]] cache_dir used when config_exec gives none.
	CacheDir string
	// Credential, when set, runs every driver call as this user; the per-job
	// temp dir and the files the double writes in it are chowned to it.
	Credential *syscall.Credential
	// TempRoot is where the per-job temp dir is made; default os.TempDir().
	TempRoot string
	// LiveLog, when set, receives the job log (masked) while the job runs.
	LiveLog io.Writer
	// KeepTemp keeps the per-job temp dir(s) instead of removing them after cleanup_exec.
	KeepTemp bool
	// KeepBuildExitCodeFile disables deleting BUILD_EXIT_CODE_FILE before
	// every call (the real runner never deletes it).
	KeepBuildExitCodeFile bool
	// RunnerName is the runner name shown in the log header; default "runnerdouble".
	RunnerName string
}

// StageCall records one driver call.
type StageCall struct {
	// Kind is "config", "prepare", "run" or "cleanup".
	Kind string
	// Stage is the run stage name (run calls only).
	Stage string
	// Args are the arguments given to the driver.
	Args []string
	// Env is the complete environment of the call (deduplicated, last value wins).
	Env []string
	// Dir is the working directory (the per-job temp dir).
	Dir string
	// ScriptPath is the script file (run calls only).
	ScriptPath string
	// Pid is the driver's PID; it is also the call's process group ID.
	Pid int
	// Pgid is the process group ID of the call (== Pid).
	Pgid int
	// ExitCode is the driver's exit code; -1 when killed by a signal or not started.
	ExitCode int
	// Signaled is true when the driver was ended by a signal.
	Signaled bool
	// PeakRSS is the driver process's own peak resident set size in
	// bytes (VmHWM, read every 2 ms while it runs; its descendants are not
	// counted). It may miss growth in the driver's last 2 ms. 0 when
	// never read.
	PeakRSS int64
	// Terminated is true when the double sent SIGTERM to the group.
	Terminated bool
	// ForceKilled is true when the double sent SIGKILL to the group.
	ForceKilled bool
	// GaveUp is true when the call did not end within the force kill timeout.
	GaveUp bool
	// StartError is set when the driver could not be started.
	StartError string
	// Start is when the call started.
	Start time.Time
	// Duration is how long the call took (until it ended or the double gave up).
	Duration time.Duration
}

// Result is the outcome of one job.
type Result struct {
	// State is "success" or "failed".
	State string
	// FailureReason is the reason sent to GitLab: "", script_failure,
	// runner_system_failure, job_execution_timeout or unknown_failure (cancel).
	FailureReason string
	// InternalFailureReason is the runner's own reason before mapping to the
	// reasons GitLab supports (e.g. job_canceled, runner_configuration_error).
	InternalFailureReason string
	// ExitCode is the job exit code the runner reports (build errors only; 0 otherwise).
	ExitCode int
	// Error is the message after "Job failed: "; "" on success.
	Error string
	// Log is the job log as the runner shows it (masked values replaced by [MASKED]).
	Log string
	// RawLog is the job log without masking, for asserting that secrets never appear.
	RawLog string
	// RunnerLog is the runner's own log: cleanup_exec's stdout/stderr and runner warnings.
	RunnerLog string
	// Stages records every driver call in order.
	Stages []StageCall
	// ConfigOutput is the decoded config_exec answer of the last attempt (nil if none).
	ConfigOutput *api.ConfigExecOutput
	// BuildsDir is the effective builds_dir.
	BuildsDir string
	// CacheDir is the effective cache_dir.
	CacheDir string
	// ProjectDir is CI_PROJECT_DIR.
	ProjectDir string
	// TempDir is the per-job temp dir of the last prepare attempt (removed unless Config.KeepTemp).
	TempDir string
	// TempDirs are the temp dirs of all prepare attempts, in order.
	TempDirs []string
	// Duration is the wall time of the whole job, cleanup_exec included.
	Duration time.Duration
}

// Calls returns the recorded calls of the given kind ("config", "prepare", "run", "cleanup").
func (r *Result) Calls(kind string) []StageCall {
	var out []StageCall
	for _, c := range r.Stages {
		if c.Kind == kind {
			out = append(out, c)
		}
	}
	return out
}

// RunStages returns the stage names of all run_exec calls, in order.
func (r *Result) RunStages() []string {
	var out []string
	for _, c := range r.Calls(KindRun) {
		out = append(out, c.Stage)
	}
	return out
}

// Call returns the last recorded run_exec call of the given stage, or nil.
func (r *Result) Call(stage string) *StageCall {
	for i := len(r.Stages) - 1; i >= 0; i-- {
		if r.Stages[i].Kind == KindRun && r.Stages[i].Stage == stage {
			return &r.Stages[i]
		}
	}
	return nil
}

// Succeeded reports whether the job succeeded.
func (r *Result) Succeeded() bool { return r.State == StateSuccess }

func (c Config) withDefaults() Config {
	if c.BaseEnv == nil {
		for _, k := range []string{"PATH", "HOME", "USER", "LANG"} {
			if v, ok := os.LookupEnv(k); ok {
				c.BaseEnv = append(c.BaseEnv, k+"="+v)
			}
		}
	}
	if c.GracefulKillTimeout <= 0 {
		c.GracefulKillTimeout = DefaultGracefulKillTimeout
	}
	if c.ForceKillTimeout <= 0 {
		c.ForceKillTimeout = DefaultForceKillTimeout
	}
	if c.PrepareRetryInterval <= 0 {
		c.PrepareRetryInterval = DefaultPrepareRetryInterval
	}
	if c.ConfigExecTimeout <= 0 {
		c.ConfigExecTimeout = DefaultExecTimeout
	}
	if c.PrepareExecTimeout <= 0 {
		c.PrepareExecTimeout = DefaultExecTimeout
	}
	if c.CleanupExecTimeout <= 0 {
		c.CleanupExecTimeout = DefaultExecTimeout
	}
	if c.AfterScriptTimeout <= 0 {
		c.AfterScriptTimeout = DefaultAfterScriptTimeout
	}
	if c.TempRoot == "" {
		c.TempRoot = os.TempDir()
	}
	if c.RunnerName == "" {
		c.RunnerName = "runnerdouble"
	}
	return c
}

func (j Job) withDefaults() Job {
	if j.ID == 0 {
		j.ID = DefaultJobID
	}
	if j.Name == "" {
		j.Name = DefaultJobName
	}
	if j.Token == "" {
		j.Token = DefaultToken
	}
	if j.ProjectFullPath == "" {
		j.ProjectFullPath = DefaultProjectFullPath
	}
	if j.Timeout <= 0 {
		j.Timeout = DefaultJobTimeout
	}
	if j.RunnerShortToken == "" {
		j.RunnerShortToken = DefaultRunnerShortToken
	}
	if j.GitStrategy == "" {
		j.GitStrategy = DefaultGitStrategy
	}
	if j.Sha == "" {
		j.Sha = fakeSHA
	}
	return j
}

// steps returns the job's step list (Steps, or Script/ExtraSteps/AfterScript).
func (j Job) steps() []Step {
	if len(j.Steps) > 0 {
		return j.Steps
	}
	steps := []Step{{Name: "script", Script: j.Script}}
	for _, s := range j.ExtraSteps {
		name := s
		if len(name) > len("step_") && name[:len("step_")] == "step_" {
			name = name[len("step_"):]
		}
		steps = append(steps, Step{Name: name, Script: []string{"echo " + shellQuote(s)}})
	}
	if len(j.AfterScript) > 0 {
		steps = append(steps, Step{Name: "after_script", Script: j.AfterScript})
	}
	return steps
}

// shellQuote single-quotes s for POSIX sh.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
