package main

import (
	"context"
	"flag"
	"fmt"
	"io"

	"github.com/ci-exec/ci-exec/internal/stages"
)

// sweep is `ci-exec sweep [--stale D] [--runner TOKEN] [--dry-run]`: it
// cancels the calling user's Slurm jobs of CI jobs that are gone (see
// stages.Sweep). It is named apart from `ci-exec reap`, the batch script's
// wrapper on a compute node.
func sweep(ctx context.Context, inv stages.Invocation, args []string, stderr io.Writer) int {
	flags := flag.NewFlagSet("ci-exec sweep", flag.ContinueOnError)
	flags.SetOutput(stderr)
	var o stages.SweepOptions
	flags.DurationVar(&o.Stale, "stale", stages.DefaultSweepStale, "how long no stage of a CI job may have run before it counts as gone")
	flags.StringVar(&o.Runner, "runner", "", "only this runner's jobs (its short token)")
	flags.BoolVar(&o.DryRun, "dry-run", false, "list what would be cancelled")
	if err := flags.Parse(args); err != nil {
		return 2
	}
	if flags.NArg() > 0 {
		fmt.Fprintf(stderr, "ERROR: ci-exec sweep takes no arguments, got %q\n", flags.Args())
		return 2
	}
	if o.Stale < 0 {
		fmt.Fprintln(stderr, "ERROR: ci-exec sweep: --stale must not be negative (e.g. --stale=5m)")
		return 2
	}
	return stages.Sweep(ctx, inv, o)
}
