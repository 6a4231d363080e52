package stages

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/mechanism/apptainer"
	"github.com/ci-exec/ci-exec/internal/mechanism/charliecloud"
	"github.com/ci-exec/ci-exec/internal/mechanism/podman"
	"github.com/ci-exec/ci-exec/internal/mechanism/template"
	"github.com/ci-exec/ci-exec/internal/proc"
	"github.com/ci-exec/ci-exec/internal/services"
)

// newRuntime returns the configured container runtime, or nil when jobs run
// on the host.
func newRuntime(st *Stage) (mechanism.Runtime, error) {
	m := st.Cfg.Mechanism()
	if m == nil {
		return nil, nil
	}
	grace := st.Cfg.General.KillTimeout.Duration
	mc := *m
	// A site profile's options for this runtime extend custom_options, so
	// the runtime sees them as the admin's own (site.go).
	mc.CustomOptions = profileOptions(st, mc.CustomOptions)
	if st.Cfg.IsBatch() && mc.ImageStorageDir == "" {
		// Compute nodes must read the converted images: by default they
		// live in the data dir, which a batch executor needs shared anyway.
		mc.ImageStorageDir = st.Layout.DataDir
	}
	switch st.Cfg.General.RunMechanism {
	case config.MechanismCharliecloud:
		return charliecloud.New(mc, st.User, st.Job.Host, grace), nil
	case config.MechanismApptainer:
		return apptainer.New(mc, st.User, st.Job.Host, grace), nil
	case config.MechanismPodman:
		return podman.New(mc, st.User, st.Job.Host, grace, os.Getuid()), nil
	}
	if t := st.Cfg.Template(); t != nil {
		return template.New(st.Cfg.General.TemplateName(), t, mc, st.User, st.Job.Host, grace, os.Getuid()), nil
	}
	return nil, failure.Systemf("general.run_mechanism %q is not supported by this build of ci-exec", st.Cfg.General.RunMechanism)
}

// setup is the mechanism's view of this job, or nil without a mechanism.
func setup(st *Stage) (*containerSetup, error) {
	rt, err := newRuntime(st)
	if rt == nil || err != nil {
		return nil, err
	}
	site, siteErr := siteFor(st.Cfg, st.Job.Vars)
	cfg := *st.Cfg.Mechanism()
	cfg.CustomOptions = profileOptions(st, cfg.CustomOptions)
	return &containerSetup{
		Runtime:  rt,
		Cfg:      cfg,
		Site:     site,
		siteErr:  siteErr,
		Services: st.Cfg.Services,
		keep: func(pid int) {
			if c := st.Inv.Child; c != nil {
				// The front records them for its own parent too.
				c.Result.Keep = append(c.Result.Keep, pid)
				return
			}
			if f := st.Job.Host[proc.KeepFileVariable]; filepath.IsAbs(f) {
				if err := proc.AppendKeepFile(f, pid); err != nil {
					st.Log.Warnf("services: could not record service process %d in %s: %v", pid, f, err)
				}
			}
		},
		Batch:     st.Cfg.IsBatch(),
		Force:     st.Cfg.General.ForceMechanism,
		Job:       st.Job,
		Layout:    st.Layout,
		User:      st.User,
		Log:       st.Log,
		HostEnv:   st.Job.Host,
		ScriptEnv: scriptEnv(st),
		Grace:     st.Cfg.General.KillTimeout.Duration,
		saveState: st.saveState,
		loadState: st.loadState,
		Table:     st.Cfg.MechanismTable(),
	}, nil
}

// prepareMechanism resolves, checks and pulls the job's image. Without a
// run mechanism jobs run on the host and there is nothing to do.
func prepareMechanism(ctx context.Context, st *Stage) error {
	s, err := setup(st)
	if err != nil {
		return err
	}
	if s == nil {
		if specs, err := services.Parse(st.Job.Vars[services.Variable], nil); err != nil || len(specs) > 0 {
			// Never a job that silently runs without its services.
			return failure.Userf("services: this runner runs jobs on the host, without a container runtime to run services with; remove services: from the job or use a runner with one")
		}
		st.Log.Printf("Jobs run on the host (no run_mechanism configured).")
		return nil
	}
	_, err = prepareContainer(ctx, *s)
	return err
}

// planStage decides where a stage runs and builds its command: on the host
// without a mechanism or when placement says so, else in the image prepare
// chose.
func planStage(ctx context.Context, st *Stage, stage, script string) (Plan, error) {
	s, err := setup(st)
	if err != nil {
		return Plan{}, err
	}
	if s == nil {
		return hostPlan(st, script)
	}
	state, err := st.loadState()
	if errors.Is(err, ErrNoState) {
		// prepare always saves a state with a mechanism; without one the
		// job's directory was removed or prepare never ran.
		return Plan{}, failure.Systemf("%s: prepare left no %s in %s; the job cannot know its image (was the job's directory removed?)",
			s.Runtime.Name(), StateFile, st.Layout.StateDir)
	}
	if err != nil {
		return Plan{}, failure.AsSystem(err)
	}
	if state.Mechanism != s.Runtime.Name() {
		return Plan{}, failure.Systemf("the job was prepared for %s but the configuration now says %s; retry the job",
			state.Mechanism, s.Runtime.Name())
	}
	sp, err := containerCommand(ctx, *s, state, stage, script)
	if err != nil {
		return Plan{}, err
	}
	if sp.Image == nil {
		return hostPlan(st, script)
	}
	where := Describe(sp.Placement, sp.Image, s.Runtime.Name())
	LogCommand(st.Log, "cmd_"+stage, fmt.Sprintf("Running %s %s", stage, where), sp.Argv, sp.Env)
	return Plan{Where: where, Argv: sp.Argv, Env: sp.Env, Dir: sp.Dir, Runtime: s.Runtime, UserArgs: sp.UserArgs, StartSignal: true}, nil
}

// releaseImages removes the job's private image copies (cleanup stage).
func releaseImages(ctx context.Context, st *Stage) {
	s, err := setup(st)
	if err != nil || s == nil {
		return
	}
	state, err := st.loadState()
	if err != nil {
		return
	}
	// Services first: they run from their images.
	s.stopServices(ctx, state)
	for _, img := range []*mechanism.Image{state.Job, state.Runner} {
		if img == nil {
			continue
		}
		if err := s.Runtime.Release(ctx, *img, st.Layout.StateDir); err != nil {
			st.Log.Warnf("cleanup: release image %s: %v", img.Ref, err)
		}
	}
}
