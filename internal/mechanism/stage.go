package mechanism

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/outcome"
)

// ContainerPath is PATH inside containers unless the image's own
// environment sets one: the host's PATH (pyenv shims, /opt/...) means
// nothing there.
const ContainerPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// StagePlan is how one stage runs under a mechanism.
type StagePlan struct {
	Placement Placement
	// Image is nil when the stage runs on the host; Argv and Env are then
	// empty and the caller builds its host command.
	Image *Image
	// Argv and Env run the runtime; Dir is its host working directory.
	Argv []string
	Env  []string
	Dir  string
	// UserArgs is true when the command carries the user's own runtime
	// arguments: a runtime failure may then be the user's doing.
	UserArgs bool
}

// StageCommand places stage and, for a container, builds its command: the
// job user's data dir, which holds the job's builds, cache and scripts
// dirs, bound at the same path (the runner's scripts use absolute host
// paths; one bind keeps the image's mount points the same for every job of
// the user, so a converted image serves them all), the user's volumes (job image only),
// the admin's options for that image, the user's checked arguments (job
// image only), a clean environment and the image's shell running script.
func StageCommand(s Setup, st *State, stage, script string) (StagePlan, error) {
	p := s.Placement(st).Place(stage)
	plan := StagePlan{Placement: p}
	switch p {
	case OnHost:
		return plan, nil
	case InJobImage:
		plan.Image = st.Job
	case InRunnerImage:
		plan.Image = st.Runner
	}
	spec := RunSpec{
		Info:    st.Info,
		Image:   *plan.Image,
		Binds:   []Bind{SamePath(s.Layout.DataDir)},
		Workdir: s.workdir(),
		Env:     s.containerEnv(),
		// The image's shell signals that it started before it runs the
		// script (see package outcome): a runtime failure is then never
		// taken for the script's exit code.
		Argv: outcome.StartCommand([]string{plan.Image.Shell, script}),
	}
	if p == InJobImage {
		spec.Binds = append(spec.Binds, st.Volumes...)
		spec.AdminOptions = s.Cfg.CustomOptions
		spec.UserArgs = st.UserArgs
	} else {
		spec.AdminOptions = s.Cfg.RunnerOptions
	}
	argv, env, err := s.Runtime.Command(spec)
	if err != nil {
		return plan, failure.AsSystem(fmt.Errorf("build the %s command: %w", s.Runtime.Name(), err))
	}
	plan.Argv, plan.Env, plan.Dir = argv, env, s.Layout.ScriptsDir
	plan.UserArgs = len(spec.UserArgs) > 0
	return plan, nil
}

// workdir is the project dir when it lies in the builds dir and exists
// (CI_PROJECT_DIR comes from the user-controllable variables), else the
// builds dir itself: before get_sources the project dir may not exist yet,
// and the runtime refuses to start in a missing directory.
func (s Setup) workdir() string {
	dir := filepath.Clean(s.Job.Vars["CI_PROJECT_DIR"])
	if filepath.IsAbs(dir) && strings.HasPrefix(dir, s.Layout.BuildsDir+"/") {
		if fi, err := os.Stat(dir); err == nil && fi.IsDir() {
			return dir
		}
	}
	return s.Layout.BuildsDir
}

// containerEnv is the container's whole environment: the job user's
// identity, a container PATH, and the host variables the admin lists in the
// runtime's pass_env. The job's own variables are not here: the runner's
// script exports them itself, and the runner's own environment (with
// CUSTOM_ENV_ copies of every secret) must not leak in.
func (s Setup) containerEnv() []string {
	env := map[string]string{}
	for k, v := range s.HostEnv {
		if config.MatchAny(s.Cfg.PassEnv, k) {
			env[k] = v
		}
	}
	env["HOME"] = s.User.Home
	env["USER"] = s.User.Name
	env["LOGNAME"] = s.User.Name
	if _, ok := env["PATH"]; !ok {
		env["PATH"] = ContainerPath
	}
	out := make([]string, 0, len(env))
	for k, v := range env {
		out = append(out, k+"="+v)
	}
	sort.Strings(out)
	return out
}
