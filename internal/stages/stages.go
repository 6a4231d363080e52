// Package stages implements the custom executor's four stages (config,
// prepare, run, cleanup) and is the only package that knows the runner's
// exit-code contract: every error from below is classified (see package
// failure) and turned into 0, $BUILD_FAILURE_EXIT_CODE (plus
// $BUILD_EXIT_CODE_FILE) or $SYSTEM_FAILURE_EXIT_CODE here.
package stages

import (
	"context"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"strconv"
	"strings"

	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/downscope"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/job"
	"github.com/ci-exec/ci-exec/internal/joblog"
)

// DriverName is what the runner prints as "Using Custom executor with driver".
const DriverName = "ci-exec"

// Version is set at build time (-ldflags "-X .../stages.Version=v1.2.3");
// otherwise it falls back to the module version or VCS revision.
var Version = ""

// DriverVersion returns the version shown in the job log.
func DriverVersion() string {
	if Version != "" {
		return Version
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		if v := bi.Main.Version; v != "" && v != "(devel)" {
			return v
		}
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && len(s.Value) >= 12 {
				return "dev-" + s.Value[:12]
			}
		}
	}
	return "dev"
}

// Invocation is one call from the runner.
type Invocation struct {
	// ConfigPath is the admin config file.
	ConfigPath string
	// Environ is the process environment (os.Environ()).
	Environ []string
	// Stdout and Stderr are the process's; for config, stdout carries only
	// the JSON answer.
	Stdout, Stderr io.Writer
	// Child is set when a downscoping front started this stage as the
	// job's user (ci-exec as-user): the config, the trusted job payload and
	// prepare's state come from it, and the exit code, the new state and
	// the audit facts go back to it.
	Child *downscope.Child
}

// Stage is what every handler works with: the loaded config, the job, its
// directories and the job log.
type Stage struct {
	Cfg    *config.Config
	Job    *job.Job
	Layout job.Layout
	Log    *joblog.Logger
	User   config.UserInfo
	Inv    Invocation
	// doc is the config document, handed to the user's stage when the
	// front downscopes.
	doc string
}

// load reads the job and the config for one call. Errors are system
// failures: without a valid config nothing can run, and the runner should
// retry (an admin may be fixing the file).
func load(inv Invocation, logTo io.Writer) (*Stage, error) {
	log := joblog.New(logTo)
	j, err := job.FromEnviron(inv.Environ)
	if j != nil && inv.Child != nil {
		// The runner's JOB_RESPONSE_FILE is readable only by its account.
		j.Response = inv.Child.Handoff.Response
	}
	if j != nil {
		log.AddSecrets(j.Secrets()...)
	}
	st := &Stage{Job: j, Log: log, Inv: inv}
	if err != nil {
		return st, failure.AsSystem(err)
	}
	name, home, err := job.CurrentUser()
	if err != nil {
		return st, failure.AsSystem(err)
	}
	st.User = config.UserInfo{Name: name, Home: home}
	path, doc := inv.ConfigPath, ""
	if inv.Child != nil {
		path, doc = inv.Child.Handoff.ConfigPath, inv.Child.Handoff.Config
	} else {
		b, err := os.ReadFile(path)
		if err != nil {
			return st, failure.AsSystem(fmt.Errorf("read config: %w (fix the ci-exec configuration; the runner will retry)", err))
		}
		doc = string(b)
	}
	cfg, err := config.Parse(doc, st.User)
	if err != nil {
		return st, failure.AsSystem(fmt.Errorf("config %s: %w (fix the ci-exec configuration; the runner will retry)", path, err))
	}
	cfg.Path = path
	st.doc = doc
	st.Cfg = cfg
	st.Layout = layoutFor(cfg, j)
	return st, nil
}

// Job-env keys that carry the layout chosen at config time to later stages,
// so that a config file edited while the job runs cannot make cleanup miss
// the job's directories.
const (
	envDataDir    = "CI_EXEC_DATA_DIR"
	envBuildsDir  = "CI_EXEC_BUILDS_DIR"
	envCacheDir   = "CI_EXEC_CACHE_DIR"
	envScriptsDir = "CI_EXEC_SCRIPTS_DIR"
	envStateDir   = "CI_EXEC_STATE_DIR"
)

func layoutFor(cfg *config.Config, j *job.Job) job.Layout {
	l := job.NewLayout(cfg.General.DataDir, j)
	from := func(key string, dst *string) {
		if v := j.Host[key]; v != "" && strings.HasPrefix(v, "/") && !strings.Contains(v, "/../") {
			*dst = v
		}
	}
	from(envDataDir, &l.DataDir)
	from(envBuildsDir, &l.BuildsDir)
	from(envCacheDir, &l.CacheDir)
	from(envScriptsDir, &l.ScriptsDir)
	from(envStateDir, &l.StateDir)
	return l
}

// layoutJobEnv is the job_env that hands the layout to later stages.
func layoutJobEnv(l job.Layout) map[string]string {
	return map[string]string{
		envDataDir:    l.DataDir,
		envBuildsDir:  l.BuildsDir,
		envCacheDir:   l.CacheDir,
		envScriptsDir: l.ScriptsDir,
		envStateDir:   l.StateDir,
	}
}

// exit maps a handler's error to the runner's exit code and writes the one
// log line that explains it.
func exit(st *Stage, err error) int {
	j := st.Job
	buildCode, systemCode := 1, 2
	if j != nil {
		buildCode, systemCode = j.BuildFailureCode, j.SystemFailureCode
	}
	if err == nil {
		return 0
	}
	switch failure.ClassOf(err) {
	case failure.Script:
		writeExitCode(st, failure.CodeOf(err))
		return buildCode
	case failure.User:
		st.Log.Errorf("%v", err)
		if c := failure.CodeOf(err); c != 0 {
			writeExitCode(st, c)
		}
		return buildCode
	default:
		st.Log.Errorf("ci-exec: %v", err)
		return systemCode
	}
}

func writeExitCode(st *Stage, code int) {
	if c := st.Inv.Child; c != nil {
		c.Result.ScriptCode = &code
		return
	}
	if st.Job == nil || st.Job.ExitCodeFile == "" {
		return
	}
	if err := os.WriteFile(st.Job.ExitCodeFile, []byte(strconv.Itoa(code)+"\n"), 0o600); err != nil {
		st.Log.Warnf("could not record exit code %d in %s: %v", code, st.Job.ExitCodeFile, err)
	}
}

// guard turns a panic into a system failure: a driver bug must never look
// like the user's fault.
func guard(st **Stage, code *int, logTo io.Writer) {
	if r := recover(); r != nil {
		s := *st
		if s == nil {
			s = &Stage{Log: joblog.New(logTo)}
		}
		*code = exit(s, failure.Systemf("internal error: %v\n%s", r, debug.Stack()))
	}
}

// Config runs the config stage.
func Config(ctx context.Context, inv Invocation) (code int) {
	var st *Stage
	defer guard(&st, &code, inv.Stderr)
	st, err := load(inv, inv.Stderr)
	if err == nil && st.downscopes() {
		return st.delegate(ctx, downscope.StageConfig, "", "")
	}
	if err == nil {
		err = runConfig(ctx, st)
	}
	return exit(st, err)
}

// Prepare runs the prepare stage.
func Prepare(ctx context.Context, inv Invocation) (code int) {
	var st *Stage
	defer guard(&st, &code, inv.Stdout)
	st, err := load(inv, inv.Stdout)
	if err == nil && st.downscopes() {
		return st.delegate(ctx, downscope.StagePrepare, "", "")
	}
	if err == nil {
		err = runPrepare(ctx, st)
	}
	return exit(st, err)
}

// Run runs one run stage: the runner's script at scriptPath for stage.
func Run(ctx context.Context, inv Invocation, scriptPath, stage string) (code int) {
	var st *Stage
	defer guard(&st, &code, inv.Stdout)
	st, err := load(inv, inv.Stdout)
	if err == nil && st.downscopes() {
		return st.delegate(ctx, downscope.StageRun, scriptPath, stage)
	}
	if err == nil {
		err = runStage(ctx, st, scriptPath, stage)
	}
	return exit(st, err)
}

// Cleanup runs the cleanup stage. It always exits 0: a cleanup problem must
// never fail a job that succeeded. Its output reaches only the runner's log.
func Cleanup(ctx context.Context, inv Invocation) int {
	var st *Stage
	code := 0
	func() {
		defer guard(&st, &code, inv.Stderr)
		var err error
		st, err = load(inv, inv.Stderr)
		if err != nil {
			st.Log.Warnf("cleanup: %v", err)
			if st.Cfg == nil {
				// Without a config the layout is only known from job_env.
				cleanupFromJobEnv(st)
			}
			return
		}
		if st.downscopes() {
			st.delegate(ctx, downscope.StageCleanup, "", "")
			return
		}
		runCleanup(ctx, st)
	}()
	return 0
}
