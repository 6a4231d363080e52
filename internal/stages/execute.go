package stages

import (
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/outcome"
	"github.com/ci-exec/ci-exec/internal/proc"
)

// diagnoseTail is how much of a container stage's stderr is kept to find
// the runtime's own error line when it failed before the script.
const diagnoseTail = 4 << 10

// execute runs a plan locally and classifies its end.
func execute(ctx context.Context, st *Stage, stage string, plan Plan) error {
	stderr := st.Inv.Stderr
	var tail *proc.Tail
	if plan.StartSignal {
		// Only a container runtime can fail with its own error line; the
		// host's stderr goes to the runner untouched (a copy could
		// interleave with stdout in mid-line).
		tail = proc.NewTail(diagnoseTail)
		stderr = io.MultiWriter(stderr, tail)
	}
	var start *outcome.StartFile
	var extra []*os.File
	if plan.StartSignal {
		var err error
		if start, err = outcome.NewStartFile(); err != nil {
			return failure.Systemf("create the stage's start signal: %v", err)
		}
		defer start.Close()
		extra = []*os.File{start.File()}
	}
	res, err := proc.Run(ctx, proc.Cmd{
		Argv:       plan.Argv,
		Env:        plan.Env,
		Dir:        plan.Dir,
		Stdout:     st.Inv.Stdout,
		Stderr:     stderr,
		Grace:      st.Cfg.General.KillTimeout.Duration,
		ExtraFiles: extra,
	})
	// proc.Run has ended what the script left running; say so, in one line.
	if line := proc.Summary(scriptLeftovers(plan.Runtime, res.LeftBehind)); line != "" {
		st.Log.Printf("%s", line)
	}
	if len(res.Survivors) > 0 {
		st.Log.Warnf("could not stop %d process(es) the stage left running: %s", len(res.Survivors), strings.Join(res.Survivors, ", "))
	}
	o := outcome.Outcome{
		Where:   plan.Where,
		Program: filepath.Base(plan.Argv[0]),
		Exited:  true,
		Runtime: plan.Runtime.Name(),
	}
	if plan.UserArgs {
		o.UserArgsVariable = plan.Runtime.UserArgsVariable()
	}
	var se *proc.StartError
	switch {
	case errors.As(err, &se):
		// The program could not be started at all: as a command shell
		// reports it, and never the script's exit.
		o.ExitCode = 127
		o.Diagnosis = err.Error() + " (is " + plan.Argv[0] + " installed and executable?)"
		return classify(stage, o)
	case err != nil:
		return failure.AsSystem(err)
	}
	if res.Killed {
		st.Log.Warnf("the stage did not stop within kill_timeout (%s) after SIGTERM and was killed", st.Cfg.General.KillTimeout.Duration)
	}
	o.ExitCode, o.Stopped, o.Killed = res.ExitCode, res.Stopped, res.Killed
	if res.Signaled {
		o.Signal = int(res.Signal)
	}
	// Without a start signal the script is the program ci-exec started
	// (bash on the host): it began when the exec succeeded.
	o.Started = start == nil || start.Started()
	if tail != nil && res.ExitCode != 0 {
		o.Diagnosis = plan.Runtime.Diagnose(res.ExitCode, tail.String())
	}
	return classify(stage, o)
}

// scriptLeftovers are the leftovers that were the script's: not the
// runtime's own helpers (mechanism.Helpers).
func scriptLeftovers(rt mechanism.Runtime, names []string) []string {
	h, ok := rt.(mechanism.Helpers)
	if !ok {
		return names
	}
	own := h.HelperProcesses()
	var out []string
	for _, n := range names {
		if !slices.Contains(own, n) {
			out = append(out, n)
		}
	}
	return out
}
