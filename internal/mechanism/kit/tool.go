package kit

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path/filepath"
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
	// Progress, when set, reports a long run's work in the job log.
	Progress *Progress
}

// Progress makes a long pull or conversion visible: every few seconds one
// job-log line with the bytes (and files: layers, blobs) the tool added
// to its download or output directories since it started, and the rate.
// A tool that ends within First (3 s) prints nothing.
type Progress struct {
	// What names the work ("ch-image pull", "apptainer pull").
	What string
	// Dirs are where the tool writes what it fetches or makes.
	Dirs []string
	// Logf writes one job-log line (safe for concurrent use).
	Logf func(format string, args ...any)
	// First is when the first line comes (default 3 s), Every how often
	// after that (default 5 s).
	First, Every time.Duration
}

// usage sums the sizes and counts the regular files under dirs.
func usage(dirs []string) (bytes int64, files int) {
	for _, d := range dirs {
		_ = filepath.WalkDir(d, func(_ string, e fs.DirEntry, err error) error {
			if err != nil || !e.Type().IsRegular() {
				return nil
			}
			if fi, err := e.Info(); err == nil {
				bytes += fi.Size()
				files++
			}
			return nil
		})
	}
	return bytes, files
}

// watch logs p's lines until stop is closed.
func (p *Progress) watch(start time.Time, stop <-chan struct{}, done chan<- struct{}) {
	defer close(done)
	first, every := p.First, p.Every
	if every <= 0 {
		every = 5 * time.Second
	}
	if first <= 0 {
		first = min(3*time.Second, every)
	}
	baseBytes, baseFiles := usage(p.Dirs)
	t := time.NewTimer(first)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		b, f := usage(p.Dirs)
		b, f = max(b-baseBytes, 0), max(f-baseFiles, 0)
		el := time.Since(start)
		rate := float64(b) / el.Seconds()
		p.Logf("%s: %s in %d new file(s) after %s (%s/s)", p.What, HumanBytes(b), f, el.Round(time.Second), HumanBytes(int64(rate)))
		t.Reset(every)
	}
}

// HumanBytes is n in B, KiB, MiB or GiB with one decimal.
func HumanBytes(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
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
	if p := t.Progress; p != nil && p.Logf != nil {
		stop, done := make(chan struct{}), make(chan struct{})
		go p.watch(start, stop, done)
		defer func() { close(stop); <-done }()
	}
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
