package batch

import (
	"fmt"
	"os"
	"strings"
	"time"
)

// Reaper is how the batch script ends what the stage command leaves
// running on the compute node. Slurm ends a job's processes when the
// batch script exits, but only those its proctrack plugin follows:
// proctrack/linuxproc (and pgid) lose a process that left with setsid or a
// double fork, and even proctrack/cgroup waits for nothing before the
// script's end is reported. So the script runs the command under
// `ci-exec reap`, which ends the leftovers exactly as a local stage does
// before the end marker is written.
type Reaper struct {
	// Path is ci-exec's own absolute path, which must be the same on the
	// compute nodes ("" = run the command bare).
	Path string
	// Grace is kill_timeout: how long a cancelled command gets between
	// SIGTERM and SIGKILL.
	Grace time.Duration
	// Helpers are the runtime's own leftovers (mechanism.Helpers), ended
	// without being named as the script's.
	Helpers []string
}

// SelfReaper is this ci-exec as the batch script's reaper.
func SelfReaper(grace time.Duration) (Reaper, error) {
	exe, err := os.Executable()
	if err != nil {
		return Reaper{}, fmt.Errorf("find ci-exec's own path for the batch script: %w", err)
	}
	// A binary replaced while this one runs reads as "PATH (deleted)":
	// the compute node runs what is at PATH now.
	return Reaper{Path: strings.TrimSuffix(exe, " (deleted)"), Grace: grace}, nil
}

// prologue sets the positional parameters to the wrapper the command line
// starts with ("$@"): `ci-exec reap` where the node has it, nothing (with
// a warning in the job's output) where it does not, so that a node
// without ci-exec still runs the job.
func (r Reaper) prologue() string {
	if r.Path == "" {
		return ""
	}
	q := shellQuote(r.Path)
	var helpers strings.Builder
	for _, h := range r.Helpers {
		helpers.WriteString(" " + shellQuote("--helper="+h))
	}
	return fmt.Sprintf(`if [ -x %s ]; then
  set -- %s reap --grace=%s%s --
else
  printf 'WARNING: ci-exec is not at %%s on %%s: processes the stage leaves running there are not stopped when it ends (install ci-exec at the same path on every compute node: docs/slurm.md)\n' %s "${SLURMD_NODENAME:-this node}" >&2
  set --
fi
`, q, q, r.Grace, helpers.String(), q)
}

// prefix starts the command line.
func (r Reaper) prefix() string {
	if r.Path == "" {
		return ""
	}
	return `"$@" `
}
