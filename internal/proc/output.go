package proc

import (
	"bytes"
	"context"
	"time"
)

// OutputLimit is how much of each stream Output keeps: enough for any
// answer of a scheduler or helper program, small enough that a program
// gone wrong cannot grow ci-exec.
const OutputLimit = 1 << 20

// Output runs a short helper program (sbatch, scontrol, scancel) the way
// Run runs a stage: its own process group, a clean environment, stdin
// /dev/null, SIGTERM then SIGKILL after c.Grace once ctx ends, nothing
// left behind. It returns what the program printed, each stream capped at
// OutputLimit bytes (the rest is read and dropped, so the program never
// blocks on a full pipe). A non-zero exit is not an error: the caller reads
// Result.ExitCode; err is a *StartError or a failure to wait.
func Output(ctx context.Context, c Cmd) (stdout, stderr []byte, res Result, err error) {
	var out, errb capped
	c.Stdout, c.Stderr = &out, &errb
	if c.Grace == 0 {
		// A helper has nothing to save on SIGTERM; a short grace keeps a
		// cancelled stage within the runner's own grace period.
		c.Grace = 2 * time.Second
	}
	res, err = Run(ctx, c)
	return out.buf.Bytes(), errb.buf.Bytes(), res, err
}

// capped keeps the first OutputLimit bytes written to it.
type capped struct{ buf bytes.Buffer }

func (c *capped) Write(p []byte) (int, error) {
	if room := OutputLimit - c.buf.Len(); room > 0 {
		c.buf.Write(p[:min(room, len(p))])
	}
	return len(p), nil
}
