package stages

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"

	"github.com/ci-exec/ci-exec/internal/batch"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/outcome"
	"github.com/ci-exec/ci-exec/internal/policy"
	"github.com/ci-exec/ci-exec/internal/proc"
)

// isBatchStage reports whether a stage goes to the scheduler: only the
// job's own script steps (build_script, step_*, unknown names). The
// runner's stages and after_script run on the login node, where the
// runner's binary and the network are.
func isBatchStage(stage string) bool {
	return !policy.IsRunnerStage(stage) && stage != "after_script"
}

// schedulerArgs checks the admin's sbatch options and the user's scheduler
// parameters; prepare calls it so that a mistake fails the job before any
// image is pulled.
func schedulerArgs(st *Stage) ([]string, error) {
	b := st.Cfg.Batch
	if err := batch.CheckAdminOptions(b.Options); err != nil {
		return nil, failure.AsSystem(err)
	}
	args, err := batch.UserArgs(b.ArgumentsVariable, st.Job.Vars, batch.Policy{Allowed: b.AllowedFlags, Denied: b.DeniedFlags})
	var argErr *batch.ArgError
	switch {
	case errors.As(err, &argErr):
		return nil, failure.Userf("%v", err)
	case err != nil:
		return nil, failure.AsSystem(err)
	}
	// The site profile's parameters, limits and GPU (site.go).
	return siteSchedulerArgs(st, args)
}

// executeBatch runs plan as a Slurm batch job, or in the job's allocation
// when prepare submitted one, and classifies its end (see classify and
// docs/slurm.md, "Exit classes").
func executeBatch(ctx context.Context, st *Stage, stage string, plan Plan) error {
	userArgs, err := schedulerArgs(st)
	if err != nil {
		return err
	}
	b := st.Cfg.Batch
	name := stageFileName(stage)
	spec := batch.SubmitSpec{
		JobName:      batch.JobName(st.Job.ID(), stage),
		Output:       filepath.Join(st.Layout.ScriptsDir, name+".slurm.out"),
		Chdir:        plan.Dir,
		AdminOptions: b.Options,
		UserArgs:     userArgs,
		Comment:      identity(st).Comment(),
	}
	s := newSlurm(st)
	if h, ok := plan.Runtime.(mechanism.Helpers); ok && s.Reaper.Path != "" {
		// The runtime's own helpers (rootless Podman's pause process) are
		// ended on the node without a job-log line.
		s.Reaper.Helpers = h.HelperProcesses()
	}
	var out io.Writer = st.Inv.Stdout
	tail := proc.NewTail(diagnoseTail)
	if plan.StartSignal {
		out = io.MultiWriter(out, tail)
	}
	argv := plan.Argv
	if !plan.StartSignal {
		// A host stage: the node's shell signals that it started, so that
		// a shell missing on the node (127) is not the script's 127.
		argv = outcome.StartCommand(argv)
	}
	script := filepath.Join(st.Layout.ScriptsDir, name+".sbatch")
	var res batch.Result
	submit := true
	if a := liveAllocation(st); a != nil {
		res, err = s.RunIn(ctx, a, batch.StageJob{Name: spec.JobName, Argv: argv, Env: plan.Env, Dir: plan.Dir,
			Script: script, Output: spec.Output, Out: out})
		var ended *batch.AllocationEndedError
		if errors.As(err, &ended) || res.Stopped || errors.Is(err, batch.ErrPendingLimit) || errors.Is(err, batch.ErrVanished) {
			// It has ended, or was cancelled with the stage: no later stage
			// may use it, and nothing is left to release.
			markAllocationEnded(st)
		}
		switch {
		case errors.As(err, &ended) && (ended.Idle || ended.State == "COMPLETED"):
			// It ended by itself (idle_limit): nothing went wrong, the
			// stage just needs a job of its own.
			st.Log.Printf("%v; submitting %s as a Slurm job of its own.", err, stage)
		case errors.As(err, &ended) && ended.State == "TIMEOUT":
			return failure.Userf("Slurm allocation %s reached its time limit before %s began: its time counts from its start in prepare, while the sources, caches and artifacts were fetched; ask for more time with --time in %s",
				ended.ID, stage, strings.Join(b.ArgumentsVariable, ", "))
		case errors.As(err, &ended):
			// Cancelled, failed node: classified by its state.
			err, submit = nil, false
		default:
			submit = false
		}
	}
	if submit {
		// The runner retries a failed prepare, never a run stage: ride out
		// a controller restart here (about 9 s per attempt while it is
		// down, 5 s apart).
		s.SubmitAttempts = 3
		st.Log.Printf("Submitting %s to Slurm: sbatch %s", stage, strings.Join(batch.SbatchArgs(spec), " "))
		res, err = s.Run(ctx, batch.Job{Spec: spec, Argv: argv, Env: plan.Env, Script: script, Out: out})
	}
	if c := st.Inv.Child; c != nil {
		c.Result.Slurm = cmp.Or(res.JobID, c.Result.Slurm) // for the audit trail
	}
	o := outcome.Outcome{
		Where:         plan.Where,
		Program:       filepath.Base(plan.Argv[0]),
		JobID:         res.JobID,
		State:         res.State,
		Exited:        res.Marker,
		ExitCode:      res.ExitCode,
		Signal:        res.Signal,
		Marker:        res.Marker,
		Started:       res.Started,
		Stopped:       res.Stopped,
		Killed:        res.Killed,
		PendingReason: res.PendingReason,
	}
	o.Runtime = plan.Runtime.Name()
	if plan.UserArgs {
		o.UserArgsVariable = plan.Runtime.UserArgsVariable()
	}
	if res.ExitCode != 0 {
		o.Diagnosis = plan.Runtime.Diagnose(res.ExitCode, tail.String())
	}
	if err := submitFailure(st, err); err != nil {
		return err
	}
	switch {
	case errors.Is(err, batch.ErrPendingLimit):
		o.State, o.Detail = outcome.PendingLimit, fmt.Sprintf("batch.pending_limit (%s)", b.PendingLimit.Duration)
	case errors.Is(err, batch.ErrVanished):
		o.State, o.Detail = outcome.Vanished, err.Error()
	case err != nil:
		return failure.Systemf("Slurm job %s: %v", res.JobID, err)
	}
	switch {
	case res.Stopped && res.JobID == "":
		st.Log.Printf("The stage was stopped while sbatch was submitting it; any job it queued was cancelled.")
	case res.Stopped:
		st.Log.Printf("Slurm job %s ended %s after the stage was stopped.", res.JobID, cmp.Or(res.State, "in an unknown state"))
	}
	return classify(stage, o)
}

// submitFailure classifies sbatch refusing a job: the user's request
// (a bad partition, impossible resources) or Slurm being unavailable. It
// returns nil for any other error.
func submitFailure(st *Stage, err error) error {
	var subErr *batch.SubmitError
	switch {
	case errors.As(err, &subErr) && subErr.User:
		return failure.Userf("Slurm refused the job: %s; check %s", subErr.Msg, strings.Join(st.Cfg.Batch.ArgumentsVariable, ", "))
	case errors.As(err, &subErr):
		return failure.Systemf("could not submit to Slurm: %s", subErr.Msg)
	}
	return nil
}

// newSlurm is the Slurm client for this job.
func newSlurm(st *Stage) *batch.Slurm {
	b := st.Cfg.Batch
	s := &batch.Slurm{
		Bin:          b.SchedulerBin,
		Poll:         b.PollInterval.Duration,
		PendingLimit: b.PendingLimit.Duration,
		UnknownLimit: b.UnknownStateLimit.Duration,
		Grace:        st.Cfg.General.KillTimeout.Duration,
		Env:          slurmEnv(st),
		User:         st.User.Name,
		Logf:         st.Log.Printf,
	}
	// What the command leaves running on the node is ended by ci-exec
	// itself there (docs/slurm.md, "What a job leaves behind").
	if r, err := batch.SelfReaper(st.Cfg.General.KillTimeout.Duration); err == nil {
		s.Reaper = r
	} else {
		st.Log.Warnf("%v: processes the stage leaves running on the compute node are not stopped when it ends", err)
	}
	return s
}

// slurmEnv is the environment of scontrol and scancel (and, for
// SLURM_CONF, sbatch's): the job user's identity, a fixed PATH, and the
// runner's SLURM_CONF when it has one, so that all three talk to the
// controller the admin set up for the runner.
func slurmEnv(st *Stage) []string {
	env := []string{"PATH=" + systemPath, "HOME=" + st.User.Home, "USER=" + st.User.Name, "LANG=C.UTF-8"}
	if c := st.Job.Host["SLURM_CONF"]; c != "" {
		env = append(env, "SLURM_CONF="+c)
	}
	return env
}

// prepareBatch checks what a batch job needs before anything is pulled,
// and with batch.allocate = "prepare" submits the job's allocation, so
// that its queue wait runs alongside the image pull and the runner's
// clone, cache and artifact stages.
func prepareBatch(ctx context.Context, st *Stage) (*batch.Allocation, error) {
	if !st.Cfg.IsBatch() {
		return nil, nil
	}
	userArgs, err := schedulerArgs(st)
	if err != nil {
		return nil, err
	}
	bin := ""
	if b := st.Cfg.Batch.SchedulerBin; b != "" {
		bin = fmt.Sprintf(" (%s)", b)
	}
	if st.Cfg.Batch.Allocate != config.AllocatePrepare {
		st.Log.Printf("User scripts run as Slurm batch jobs%s, one per stage.", bin)
		return nil, nil
	}
	return submitAllocation(ctx, st, userArgs)
}
