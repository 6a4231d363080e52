package stages

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"

	"github.com/ci-exec/ci-exec/internal/batch"
	"github.com/ci-exec/ci-exec/internal/failure"
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
	return args, nil
}

// executeBatch runs plan as a Slurm batch job and maps how it ended to
// the contract (see docs/slurm.md, "Exit classes").
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
	}
	s := &batch.Slurm{
		Bin:          b.SchedulerBin,
		Poll:         b.PollInterval.Duration,
		PendingLimit: b.PendingLimit.Duration,
		UnknownLimit: b.UnknownStateLimit.Duration,
		Grace:        st.Cfg.General.KillTimeout.Duration,
		Env:          []string{"PATH=" + systemPath, "HOME=" + st.User.Home, "USER=" + st.User.Name, "LANG=C.UTF-8"},
		Logf:         st.Log.Printf,
	}
	// What the command leaves running on the node is ended by ci-exec
	// itself there (docs/slurm.md, "What a job leaves behind").
	if r, err := batch.SelfReaper(st.Cfg.General.KillTimeout.Duration); err == nil {
		s.Reaper = r
	} else {
		st.Log.Warnf("%v: processes the stage leaves running on the compute node are not stopped when it ends", err)
	}
	var out io.Writer = st.Inv.Stdout
	tail := proc.NewTail(diagnoseTail)
	if plan.Runtime != nil {
		out = io.MultiWriter(out, tail)
	}
	st.Log.Printf("Submitting %s to Slurm: sbatch %s", stage, strings.Join(batch.SbatchArgs(spec), " "))
	res, err := s.Run(ctx, batch.Job{Spec: spec, Argv: plan.Argv, Env: plan.Env,
		Script: filepath.Join(st.Layout.ScriptsDir, name+".sbatch"), Out: out})
	var subErr *batch.SubmitError
	switch {
	case errors.As(err, &subErr) && subErr.User:
		return failure.Userf("Slurm refused the job: %s; check %s", subErr.Msg, strings.Join(b.ArgumentsVariable, ", "))
	case errors.As(err, &subErr):
		return failure.Systemf("could not submit to Slurm: %s", subErr.Msg)
	case errors.Is(err, batch.ErrPendingLimit):
		return failure.Systemf("Slurm job %s was still pending after batch.pending_limit (%s), reason %s; it was cancelled",
			res.JobID, b.PendingLimit.Duration, res.PendingReason)
	case err != nil:
		return failure.Systemf("Slurm job %s: %v", res.JobID, err)
	case res.Stopped:
		st.Log.Printf("Slurm job %s ended %s after the stage was stopped.", res.JobID, res.State)
		if res.Marker && res.ExitCode != 0 {
			return failure.ScriptExit(res.ExitCode)
		}
		return failure.ScriptExit(143)
	}
	if plan.Runtime != nil && res.ExitCode != 0 {
		if msg := plan.Runtime.Diagnose(res.ExitCode, tail.String()); msg != "" {
			return failure.Systemf("could not run the %s stage %s on the compute node: %s", stage, plan.Where, msg)
		}
	}
	return batchOutcome(res)
}

// batchOutcome is the exit class of a Slurm job that ended by itself.
func batchOutcome(res batch.Result) error {
	id := res.JobID
	switch res.State {
	case "COMPLETED", "FAILED":
		if res.ExitCode != 0 {
			return failure.ScriptExit(res.ExitCode)
		}
		if res.State == "FAILED" {
			return failure.Systemf("Slurm job %s failed before running the script (no exit code); see the output above", id)
		}
		return nil
	case "CANCELLED":
		return failure.Userf("Slurm job %s was cancelled outside ci-exec (scancel by a user or an admin)", id)
	case "TIMEOUT":
		return failure.Userf("Slurm job %s reached its time limit and was stopped; ask for more time with --time in the scheduler parameters", id)
	case "OUT_OF_MEMORY":
		return failure.Userf("Slurm job %s ran out of memory; ask for more with --mem in the scheduler parameters", id)
	case "DEADLINE":
		return failure.Userf("Slurm job %s reached its --deadline", id)
	case "NODE_FAIL", "BOOT_FAIL", "PREEMPTED":
		return failure.Systemf("Slurm job %s ended %s: the cluster, not the script, stopped it", id, res.State)
	}
	return failure.Systemf("Slurm job %s ended in state %s", id, res.State)
}

// prepareBatch checks what a batch job needs before anything is pulled.
func prepareBatch(st *Stage) error {
	if !st.Cfg.IsBatch() {
		return nil
	}
	if _, err := schedulerArgs(st); err != nil {
		return err
	}
	st.Log.Printf("User scripts run as Slurm batch jobs%s.", func() string {
		if b := st.Cfg.Batch.SchedulerBin; b != "" {
			return fmt.Sprintf(" (%s)", b)
		}
		return ""
	}())
	return nil
}
