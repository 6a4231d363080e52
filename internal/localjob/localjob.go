// Package localjob runs one job of a project's .gitlab-ci.yml on this
// machine the way gitlab-runner's custom executor would run it with
// ci-exec: it writes the job payload (JOB_RESPONSE_FILE), calls the ci-exec
// binary for config, prepare, each run stage and cleanup, each call a new
// process in its own process group with the runner's environment
// (CUSTOM_ENV_*, BUILD_FAILURE_EXIT_CODE, ...), and hands each run stage
// the script a runner would write (internal/jobscript). So a local job
// meets the same admin config, placement, allowlist, volume and user-arg
// policy, environment control and Slurm submission as a CI job.
//
// Unlike a runner it copies the project's working tree (tracked and
// untracked files, not ignored ones) into the job's project dir instead of
// fetching it, copies the job's artifacts: paths back to a directory of the
// user's instead of uploading them, and removes the job's project dir at
// the end, so nothing is left behind.
package localjob

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"gitlab.com/gitlab-org/gitlab-runner/executors/custom/api"

	"github.com/ci-exec/ci-exec/internal/gitlabci"
	"github.com/ci-exec/ci-exec/internal/jobscript"
	"github.com/ci-exec/ci-exec/internal/proc"
)

// RunnerShortToken is CI_RUNNER_SHORT_TOKEN of local jobs: their builds and
// scripts dirs are <data_dir>/builds/local/... and never those of a runner.
const RunnerShortToken = "local"

// Exit codes of the runner contract, as a runner sets them.
const (
	buildFailureCode  = 1
	systemFailureCode = 2
	// canceledCode is what ci-exec exec exits with when interrupted.
	canceledCode = 130
)

// Options say how to run the job.
type Options struct {
	// Driver is the ci-exec binary; ConfigPath its --config.
	Driver, ConfigPath string
	// Tree is the project's working tree (the directory with .gitlab-ci.yml).
	Tree string
	// ProjectPath is the project's full path (CI_PROJECT_PATH): the job's
	// project dir is <builds_dir>/<ProjectPath>.
	ProjectPath string
	// Git describes the tree's commit (zero when it is no git repo).
	Git GitInfo
	// InPlace runs the job in Tree itself: the project dir is a symlink to
	// it (for a job in an image, VolumeVariable binds it).
	InPlace bool
	// VolumeVariable is the admin's user_volume_variable, used to bind
	// the tree into the container with InPlace ("" for none).
	VolumeVariable string
	// ArtifactsDir receives the job's artifacts: paths (replaced each run).
	ArtifactsDir string
	// Vars are --var and --env-file values: they win over the file's.
	Vars []gitlabci.Variable
	// BaseEnv is the runner's own environment (PATH, HOME, ...).
	BaseEnv []string
	// Log is the job log (stdout); Diag gets cleanup's output and
	// ci-exec exec's own messages (stderr).
	Log, Diag io.Writer
	// Grace is how long a stopped stage gets between SIGTERM and SIGKILL
	// (above the stage's own kill_timeout, so ci-exec ends its children
	// first).
	Grace time.Duration
	// JobID is CI_JOB_ID; 0 picks one from the clock.
	JobID int64
}

// GitInfo is the tree's commit.
type GitInfo struct {
	Sha, Ref string
	// Branch is true when Ref is a branch (CI_COMMIT_BRANCH).
	Branch bool
}

// Result is how the job ended.
type Result struct {
	// ExitCode is what ci-exec exec exits with: the script's exit code
	// for a script failure, 1 for another build failure (a refused
	// image, ...), 2 for a system failure, 0 on success.
	ExitCode int
	// State is "success" or "failed"; Reason "", script_failure or
	// runner_system_failure.
	State, Reason string
	// Artifacts is where the artifacts were copied ("" when none).
	Artifacts string
}

type run struct {
	opt     Options
	job     *gitlabci.Job
	log     *maskWriter
	tmp     string
	respF   string
	codeF   string
	jobID   int64
	token   string
	jobEnv  map[string]string
	host    string
	builds  string
	cache   string
	project string
	status  string
	vars    []jobscript.Variable
}

// Run runs job. The error is for faults before the job could start (no
// temp dir, no driver); a failed job is a Result.
func Run(ctx context.Context, job *gitlabci.Job, opt Options) (*Result, error) {
	if opt.Driver == "" || opt.Tree == "" {
		return nil, errors.New("localjob: Driver and Tree are required")
	}
	tok := make([]byte, 16)
	if _, err := rand.Read(tok); err != nil {
		return nil, err
	}
	r := &run{opt: opt, job: job, token: "glcbt-local-" + hex.EncodeToString(tok), status: "running"}
	r.log = &maskWriter{w: opt.Log, secrets: []string{r.token}}
	r.jobID = opt.JobID
	if r.jobID == 0 {
		// Unique among this user's local jobs: the job id names the
		// scripts and state dirs of the job.
		r.jobID = time.Now().UnixMicro()
	}
	tmp, err := os.MkdirTemp("", "ci-exec-exec")
	if err != nil {
		return nil, fmt.Errorf("create the job's temp dir: %w", err)
	}
	defer os.RemoveAll(tmp)
	r.tmp = tmp
	r.respF = filepath.Join(tmp, "response.json")
	r.codeF = filepath.Join(tmp, "build_exit_code")

	res := &Result{}
	err = r.execute(ctx, res)
	r.finish(res, err)
	return res, nil
}

func (r *run) logln(format string, args ...any) {
	fmt.Fprintf(r.log, format+"\n", args...)
}

// execute is the runner's build: config, the project dir, prepare, the
// stages, artifacts, cleanup.
func (r *run) execute(ctx context.Context, res *Result) error {
	r.logln("Running with ci-exec exec (gitlab-runner %s scripts)", jobscript.RunnerVersion)
	r.logln("  on %s, local job %d of %s", hostname(), r.jobID, r.opt.Tree)
	for _, n := range r.job.Notes {
		r.logln("WARNING: %s", n)
	}
	r.vars = r.variables()
	if err := r.writeResponse(); err != nil {
		return err
	}
	timeout := r.job.Timeout
	if timeout <= 0 {
		timeout = time.Hour
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	r.logln(`Preparing the "custom" executor`)
	var stdout strings.Builder
	if err := r.call(ctx, []string{"config"}, false, &stdout, r.log); err != nil {
		return err
	}
	var out api.ConfigExecOutput
	if err := json.Unmarshal([]byte(stdout.String()), &out); err != nil {
		return fmt.Errorf("ci-exec config: error while parsing JSON output: %w", err)
	}
	if out.BuildsDir == nil || out.CacheDir == nil {
		return errors.New("ci-exec config gave no builds_dir or cache_dir")
	}
	if out.Hostname != nil {
		r.host = *out.Hostname
	}
	if out.JobEnv != nil {
		r.jobEnv = *out.JobEnv
	}
	if d := out.Driver; d != nil && d.Name != nil && d.Version != nil {
		r.logln("Using Custom executor with driver %s %s...", *d.Name, *d.Version)
	}
	r.builds, r.cache = *out.BuildsDir, *out.CacheDir
	r.project = path.Join(r.builds, r.opt.ProjectPath)
	r.vars = r.variables()
	// From here the job has dirs: cleanup always runs, and the project dir
	// goes with it.
	defer r.cleanup()

	if err := r.setUpProjectDir(); err != nil {
		return err
	}
	if err := r.call(ctx, []string{"prepare"}, true, nil, r.log); err != nil {
		return err
	}
	if err := r.stage(ctx, "prepare_script"); err != nil {
		return fmt.Errorf("prepare environment: %w", err)
	}
	err := r.stage(ctx, "get_sources")
	if err == nil {
		err = r.stage(ctx, "step_script")
	}
	if ctx.Err() != nil && err != nil {
		err = r.contextError(ctx, err)
	}
	r.status = "success"
	if err != nil {
		r.status = "failed"
		if errors.Is(ctx.Err(), context.Canceled) {
			r.status = "canceled"
		}
	}
	r.vars = r.variables()
	if len(r.job.AfterScript) > 0 {
		// after_script gets its own 5 minutes, as with the runner, even
		// after a timeout.
		actx, acancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Minute)
		if aerr := r.stage(actx, "after_script"); aerr != nil {
			r.logln("WARNING: after_script failed, but job will continue unaffected: %v", aerr)
		}
		acancel()
	}
	if len(r.job.ArtifactPaths) > 0 && jobscript.WhenAllows(r.job.ArtifactsWhen, err != nil) {
		r.logln("Copying artifacts")
		dir, cerr := r.copyArtifacts()
		if cerr != nil {
			r.logln("WARNING: artifacts: %v", cerr)
		}
		res.Artifacts = dir
	}
	cctx, ccancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Minute)
	if cerr := r.stage(cctx, "cleanup_file_variables"); cerr != nil {
		fmt.Fprintf(r.opt.Diag, "WARNING: Error while executing file based variables removal script: %v\n", cerr)
	}
	ccancel()
	return err
}

func (r *run) contextError(ctx context.Context, err error) error {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return &jobError{msg: fmt.Sprintf("execution took longer than %v", r.timeout()), code: buildFailureCode, reason: "job_execution_timeout"}
	}
	// Interrupted (Ctrl-C, SIGTERM): the shell's code for SIGINT.
	return &jobError{msg: "canceled", code: canceledCode, reason: "job_canceled"}
}

func (r *run) timeout() time.Duration {
	if r.job.Timeout > 0 {
		return r.job.Timeout
	}
	return time.Hour
}

// finish is the runner's last line and the exit code.
func (r *run) finish(res *Result, err error) {
	if err == nil {
		r.logln("Job succeeded")
		res.State = "success"
		return
	}
	res.State = "failed"
	var je *jobError
	if errors.As(err, &je) && je.reason != "runner_system_failure" {
		res.Reason = je.reason
		res.ExitCode = je.code
		r.logln("ERROR: Job failed: %s", je.msg)
		return
	}
	res.Reason = "runner_system_failure"
	res.ExitCode = systemFailureCode
	r.logln("ERROR: Job failed (system failure): %v", err)
}

// jobError is a failed driver call the runner would report.
type jobError struct {
	msg    string
	code   int
	reason string
}

func (e *jobError) Error() string { return e.msg }

// call runs one driver call like the runner: its own process group, no
// stdin, cwd and TMPDIR the job's temp dir, the runner's environment.
func (r *run) call(ctx context.Context, args []string, withJobEnv bool, stdout, stderr io.Writer) error {
	_ = os.Remove(r.codeF)
	argv := append([]string{r.opt.Driver}, "--config", r.opt.ConfigPath)
	argv = append(argv, args...)
	if stdout == nil {
		stdout = stderr
	}
	// The job's services outlive prepare (they reparent to this process,
	// a subreaper): the driver names them in the keep file, and they are
	// not this call's leftovers; cleanup stops them.
	keepFile := filepath.Join(r.tmp, "keep-pids")
	res, err := proc.Run(ctx, proc.Cmd{
		Argv: argv, Env: append(r.env(withJobEnv), proc.KeepFileVariable+"="+keepFile), Dir: r.tmp,
		Stdout: stdout, Stderr: stderr, Grace: r.opt.Grace,
		Keep: func() []int { return proc.ReadKeepFile(keepFile) },
	})
	if err != nil {
		return fmt.Errorf("start %s: %w", r.opt.Driver, err)
	}
	if res.Stopped {
		return r.contextError(ctx, nil)
	}
	switch res.ExitCode {
	case 0:
		return nil
	case buildFailureCode:
		b, err := os.ReadFile(r.codeF)
		code, perr := strconv.Atoi(strings.TrimSpace(strings.SplitN(string(b), "\n", 2)[0]))
		if err != nil || perr != nil {
			return &jobError{msg: "exit status 1", code: buildFailureCode, reason: "script_failure"}
		}
		return &jobError{msg: fmt.Sprintf("exit status %d", code), code: code, reason: "script_failure"}
	case systemFailureCode:
		return fmt.Errorf("ci-exec %s: exit status 2", args[0])
	}
	return fmt.Errorf("unknown Custom executor executable exit code %d", res.ExitCode)
}

// stage runs one run stage with the script a runner would write.
func (r *run) stage(ctx context.Context, stage string) error {
	if err := ctx.Err(); err != nil {
		return r.contextError(ctx, err)
	}
	script, ok, err := r.scriptContext().StageScript(stage, "bash")
	if err != nil {
		return err
	}
	if !ok {
		return nil
	}
	r.logln("%s", jobscript.StageDescription(stage))
	dir, err := os.MkdirTemp(r.tmp, "script")
	if err != nil {
		return err
	}
	file := filepath.Join(dir, "script")
	if err := os.WriteFile(file, []byte(script), 0o700); err != nil {
		return err
	}
	runStage := stage
	if stage == "step_script" {
		runStage = "build_script"
	}
	return r.call(ctx, []string{"run", file, runStage}, true, nil, r.log)
}

func (r *run) steps() []jobscript.Step {
	steps := []jobscript.Step{{Name: "script", Script: append(append([]string(nil), r.job.BeforeScript...), r.job.Script...)}}
	if len(r.job.AfterScript) > 0 {
		steps = append(steps, jobscript.Step{Name: "after_script", Script: r.job.AfterScript})
	}
	return steps
}

func (r *run) scriptContext() jobscript.Context {
	return jobscript.Context{
		Vars: r.vars, BuildsDir: r.builds, CacheDir: r.cache, ProjectDir: r.project,
		ProjectPath: r.opt.ProjectPath, Hostname: r.host, GitStrategy: "none",
		Sha: r.opt.Git.Sha, Ref: r.opt.Git.Ref, Steps: r.steps(), JobID: r.jobID, Token: r.token,
	}
}

// cleanup is cleanup_exec (its output to stderr, as a runner keeps it in
// its own log), then the job's project dir and its .tmp sibling go: a
// local job leaves nothing in the builds dir.
func (r *run) cleanup() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if err := r.call(ctx, []string{"cleanup"}, true, nil, r.opt.Diag); err != nil {
		fmt.Fprintf(r.opt.Diag, "WARNING: Cleanup script failed: %v\n", err)
	}
	for _, d := range []string{r.project, r.project + ".tmp"} {
		// RemoveAll does not follow a symlink: with --in-place only the
		// link goes, never the user's tree.
		if err := os.RemoveAll(d); err != nil {
			fmt.Fprintf(r.opt.Diag, "WARNING: remove %s: %v\n", d, err)
		}
	}
	// The now-empty parents: the project's namespace dirs, the builds dir
	// of this local slot and its runner dir, the (unused) cache dir. A dir
	// another local job still uses is not empty and stays.
	for d := path.Dir(r.project); len(d) > len(r.builds) && strings.HasPrefix(d, r.builds+"/"); d = path.Dir(d) {
		if os.Remove(d) != nil {
			break
		}
	}
	if os.Remove(r.builds) == nil {
		_ = os.Remove(path.Dir(r.builds))
	}
	_ = os.Remove(r.cache)
}

// env is a driver call's environment, in the runner's order.
func (r *run) env(withJobEnv bool) []string {
	env := append([]string(nil), r.opt.BaseEnv...)
	env = append(env,
		"TMPDIR="+r.tmp,
		"BUILD_FAILURE_EXIT_CODE="+strconv.Itoa(buildFailureCode),
		"SYSTEM_FAILURE_EXIT_CODE="+strconv.Itoa(systemFailureCode),
		"BUILD_EXIT_CODE_FILE="+r.codeF,
		"JOB_RESPONSE_FILE="+r.respF,
	)
	if withJobEnv {
		// In key order, as the runner adds job_env.
		for _, k := range slices.Sorted(maps.Keys(r.jobEnv)) {
			env = append(env, k+"="+r.jobEnv[k])
		}
	}
	for _, v := range r.vars {
		env = append(env, "CUSTOM_ENV_"+v.Key+"="+v.Value)
	}
	return append(env, "CUSTOM_ENV_CI_JOB_SERVICES="+r.servicesJSON())
}

func (r *run) servicesJSON() string {
	if len(r.job.Services) == 0 {
		return ""
	}
	// The runner's shape (executors/custom/custom.go jsonService).
	type svc struct {
		Name       string            `json:"name"`
		Alias      string            `json:"alias"`
		Entrypoint []string          `json:"entrypoint"`
		Command    []string          `json:"command"`
		Variables  map[string]string `json:"variables,omitempty"`
	}
	var out []svc
	for _, s := range r.job.Services {
		v := svc{Name: s.Name, Alias: s.Alias, Entrypoint: s.Entrypoint, Command: s.Command}
		for _, kv := range s.Variables {
			if v.Variables == nil {
				v.Variables = map[string]string{}
			}
			v.Variables[kv.Key] = kv.Value
		}
		out = append(out, v)
	}
	b, _ := json.Marshal(out)
	return string(b)
}

func hostname() string {
	h, err := os.Hostname()
	if err != nil {
		return "localhost"
	}
	return h
}

// maskWriter replaces the job token in the log, as GitLab masks it. The
// token never reaches the log in practice (the stages keep it off argv
// and out of their own lines); this is the runner's second line.
type maskWriter struct {
	w       io.Writer
	secrets []string
}

func (m *maskWriter) Write(p []byte) (int, error) {
	s := string(p)
	for _, sec := range m.secrets {
		s = strings.ReplaceAll(s, sec, "[MASKED]")
	}
	if _, err := io.WriteString(m.w, s); err != nil {
		return 0, err
	}
	return len(p), nil
}
