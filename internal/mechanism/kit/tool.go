package kit

import (
	"context"
	"errors"
	"io"
	"strings"
	"time"

	"github.com/ci-exec/ci-exec/internal/proc"
)

// Tool is one run of a runtime's helper program (pull, convert) whose
// output goes to the job log and whose end is classified by the runtime.
type Tool struct {
	Argv []string
	// Env is the complete environment: secrets (registry credentials) may
	// travel only here, never in Argv.
	Env []string
	Dir string
	// Output receives stdout and stderr (a redacting job-log writer).
	Output io.Writer
	Grace  time.Duration
}

// ToolResult is how a tool ended.
type ToolResult struct {
	ExitCode int
	// Tail is the end of its combined output, for error classification.
	Tail    string
	Elapsed time.Duration
}

// tailSize is how much output is kept for classifying a failure: the
// runtimes print their one-line error last.
const tailSize = 8 << 10

// RunTool runs t with stdin from /dev/null (so a tool can never wait for a
// password prompt) in its own process group, and returns its exit status.
// A tool that cannot be started is an error; a non-zero exit is not.
func RunTool(ctx context.Context, t Tool) (ToolResult, error) {
	tail := proc.NewTail(tailSize)
	var out io.Writer = tail
	if t.Output != nil {
		out = io.MultiWriter(t.Output, tail)
	}
	start := time.Now()
	res, err := proc.Run(ctx, proc.Cmd{Argv: t.Argv, Env: t.Env, Dir: t.Dir, Stdout: out, Stderr: out, Grace: t.Grace})
	r := ToolResult{ExitCode: res.ExitCode, Tail: tail.String(), Elapsed: time.Since(start)}
	if err != nil {
		return r, err
	}
	if res.Stopped {
		return r, errors.New("stopped: the stage was cancelled or timed out")
	}
	return r, nil
}

// LastLine returns the last non-empty line of s that starts with one of the
// prefixes (or the last non-empty line at all when none are given), trimmed.
func LastLine(s string, prefixes ...string) string {
	lines := strings.Split(s, "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		l := strings.TrimSpace(lines[i])
		if l == "" {
			continue
		}
		if len(prefixes) == 0 {
			return l
		}
		for _, p := range prefixes {
			if strings.HasPrefix(l, p) {
				return l
			}
		}
	}
	return ""
}
