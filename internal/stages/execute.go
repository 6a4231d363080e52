package stages

import (
	"context"
	"fmt"
	"io"
	"strings"

	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/proc"
)

// diagnoseTail is how much of a container stage's stderr is kept to tell a
// runtime failure (ch-run's own error line) from the script's exit code.
const diagnoseTail = 4 << 10

// execute runs a plan locally and classifies its end.
func execute(ctx context.Context, st *Stage, stage string, plan Plan) error {
	stderr := st.Inv.Stderr
	var tail *proc.Tail
	if plan.Runtime != nil {
		tail = proc.NewTail(diagnoseTail)
		stderr = io.MultiWriter(stderr, tail)
	}
	res, err := proc.Run(ctx, proc.Cmd{
		Argv:   plan.Argv,
		Env:    plan.Env,
		Dir:    plan.Dir,
		Stdout: st.Inv.Stdout,
		Stderr: stderr,
		Grace:  st.Cfg.General.KillTimeout.Duration,
	})
	// proc.Run has ended what the script left running; say so, in one line.
	if line := proc.Summary(res.LeftBehind); line != "" {
		st.Log.Printf("%s", line)
	}
	if len(res.Survivors) > 0 {
		st.Log.Warnf("could not stop %d process(es) the stage left running: %s", len(res.Survivors), strings.Join(res.Survivors, ", "))
	}
	if err != nil {
		return failure.AsSystem(fmt.Errorf("%w (is %s installed and executable?)", err, plan.Argv[0]))
	}
	if res.Killed {
		st.Log.Warnf("the stage did not stop within kill_timeout (%s) after SIGTERM and was killed", st.Cfg.General.KillTimeout.Duration)
	}
	if res.ExitCode == 0 {
		return nil
	}
	if tail != nil && !res.Stopped {
		// The runtime failed before the script ran: an infrastructure
		// fault (the runner retries), not the script's exit code.
		if msg := plan.Runtime.Diagnose(res.ExitCode, tail.String()); msg != "" {
			if plan.UserArgs {
				// Most likely a flag the user added (a --cd to a missing
				// directory, say): theirs to fix, not worth a retry.
				return failure.Userf("could not run the %s stage %s: %s; check the arguments in %s",
					stage, plan.Where, msg, plan.Runtime.UserArgsVariable())
			}
			return failure.Systemf("could not run the %s stage %s: %s", stage, plan.Where, msg)
		}
	}
	return failure.ScriptExit(res.ExitCode)
}
