package stages

import (
	"context"
	"fmt"

	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/proc"
)

// execute runs a plan locally and classifies its end.
func execute(ctx context.Context, st *Stage, _ string, plan Plan) error {
	res, err := proc.Run(ctx, proc.Cmd{
		Argv:   plan.Argv,
		Env:    plan.Env,
		Dir:    plan.Dir,
		Stdout: st.Inv.Stdout,
		Stderr: st.Inv.Stderr,
		Grace:  st.Cfg.General.KillTimeout.Duration,
	})
	proc.KillOrphans()
	if err != nil {
		return failure.AsSystem(fmt.Errorf("%w (is %s installed and executable?)", err, plan.Argv[0]))
	}
	if res.Killed {
		st.Log.Warnf("the stage did not stop within kill_timeout (%s) after SIGTERM and was killed", st.Cfg.General.KillTimeout.Duration)
	}
	if res.ExitCode != 0 {
		return failure.ScriptExit(res.ExitCode)
	}
	return nil
}
