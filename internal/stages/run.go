package stages

import (
	"context"
	"regexp"

	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/mechanism"
)

// Plan is how one stage runs: a complete argv and environment, executed
// without a shell.
type Plan struct {
	// Where is "host" or the image the stage runs in (for the log).
	Where string
	Argv  []string
	Env   []string
	Dir   string
	// Runtime runs the stage: the host or a container runtime (which
	// tells its own failures from the script's).
	Runtime mechanism.Runtime
	// UserArgs is true when the container command carries the user's own
	// runtime arguments.
	UserArgs bool
	// StartSignal is true when the command signals on fd 3 that the
	// stage's script began (outcome.StartCommand), which tells a runtime
	// failure from the script's exit code.
	StartSignal bool
}

var unsafeFileChars = regexp.MustCompile(`[^A-Za-z0-9_.-]+`)

// runStage copies the runner's script into the job's scripts dir (bound into
// containers at the same path, and on storage a compute node can read) and
// runs it.
func runStage(ctx context.Context, st *Stage, scriptPath, stage string) error {
	if err := st.Layout.Create(); err != nil {
		return failure.AsSystem(err)
	}
	defer holdJobLock(st)()
	allocationBefore(ctx, st, stage)
	err := runStageScript(ctx, st, scriptPath, stage)
	allocationAfter(ctx, st, stage, err)
	return err
}

func runStageScript(ctx context.Context, st *Stage, scriptPath, stage string) error {
	script, err := copyScript(ctx, st, scriptPath, stage)
	if err != nil {
		return err
	}
	defer retireScript(st, stage, script)
	defer showServicesOutput(st) // CI_DEBUG_SERVICES (services.go)
	plan, err := planStage(ctx, st, stage, script)
	if err != nil {
		return err
	}
	if st.Cfg.IsBatch() && isBatchStage(stage) {
		return executeBatch(ctx, st, stage, plan)
	}
	return execute(ctx, st, stage, plan)
}
