package stages

import (
	"fmt"

	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/outcome"
)

// classify maps how a stage's command ended, as an executor (local or
// Slurm) observed it, to the runner's exit class: nil (success),
// failure.ScriptExit (the script's own exit code), failure.Userf (the
// job's author must change something) or failure.Systemf (the
// infrastructure failed; the runner retries). It is the only place that
// makes this decision; docs/slurm.md ("Exit classes") is its table.
//
// The rules, in order:
//   - a stopped stage (cancel, job timeout) reports the script's code, or
//     143 (SIGTERM) when none is known;
//   - Slurm's own verdicts (pending limit, vanished, TIMEOUT, OOM,
//     NODE_FAIL, ...) decide, except that a script that reported success
//     (end marker, exit 0) succeeded: what happened after it ended is not
//     the job's result;
//   - a non-zero exit before the script started (no start signal: see
//     package outcome) is the runtime's or the node's failure, never the
//     script's exit code, however the stderr reads; it is the user's only
//     when their own runtime arguments were on the command line and the
//     runtime was found;
//   - anything else is the script's exit code.
func classify(stage string, o outcome.Outcome) error {
	job := "Slurm job " + o.JobID
	succeeded := o.Exited && o.ExitCode == 0 && o.Started
	if o.Stopped {
		switch {
		case o.Exited && o.ExitCode != 0:
			return failure.ScriptExit(o.ExitCode)
		case o.Exited:
			return nil
		}
		return failure.ScriptExit(143)
	}
	switch o.State {
	case "", "COMPLETED", "FAILED":
		// Below.
	case outcome.PendingLimit:
		return failure.Systemf("%s was still pending after %s, reason %s; it was cancelled", job, o.Detail, o.PendingReason)
	case outcome.Vanished:
		return failure.Systemf("%s: %s", job, o.Detail)
	case "CANCELLED":
		return failure.Userf("%s was cancelled outside ci-exec (scancel by a user or an admin)", job)
	case "TIMEOUT":
		return failure.Userf("%s reached its time limit and was stopped; ask for more time with --time in the scheduler parameters", job)
	case "DEADLINE":
		return failure.Userf("%s reached its --deadline", job)
	case "OUT_OF_MEMORY":
		if succeeded {
			return nil
		}
		return failure.Userf("%s ran out of memory; ask for more with --mem in the scheduler parameters", job)
	case "NODE_FAIL", "BOOT_FAIL", "PREEMPTED":
		if succeeded {
			return nil
		}
		return failure.Systemf("%s ended %s: the cluster, not the script, stopped it", job, o.State)
	default:
		return failure.Systemf("%s ended in state %s", job, o.State)
	}
	if !o.Exited {
		// Slurm ended the job but the batch script's end marker never
		// showed up in the output file.
		if o.State == "COMPLETED" {
			// The batch script exits with the command's code: 0.
			return nil
		}
		return failure.Systemf("%s failed (exit code %d, signal %d) without reporting the end of the stage's command; see the output above",
			job, o.ExitCode, o.Signal)
	}
	if o.ExitCode == 0 {
		return nil
	}
	if !o.Started {
		return notStarted(stage, o)
	}
	return failure.ScriptExit(o.ExitCode)
}

// notStarted is a command that failed before the stage's script began.
func notStarted(stage string, o outcome.Outcome) error {
	where := o.Where
	if where == "host" {
		where = "on the host"
	}
	if o.JobID != "" {
		where += fmt.Sprintf(" (Slurm job %s, on its compute node)", o.JobID)
	}
	msg := o.Diagnosis
	missing := o.ExitCode == 126 || o.ExitCode == 127
	if msg == "" {
		msg = fmt.Sprintf("%s exited %d before the script started", o.Program, o.ExitCode)
		if missing {
			msg += fmt.Sprintf(" (is %s installed and executable there?)", o.Program)
		}
	}
	if o.UserArgsVariable != "" && !missing {
		// Most likely a flag the user added (a --cd to a missing
		// directory, say): theirs to fix, not worth a retry.
		return failure.Userf("could not run the %s stage %s: %s; check the arguments in %s", stage, where, msg, o.UserArgsVariable)
	}
	return failure.Systemf("could not run the %s stage %s: %s", stage, where, msg)
}
