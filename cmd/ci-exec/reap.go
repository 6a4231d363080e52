package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"slices"
	"strings"
	"time"

	"github.com/ci-exec/ci-exec/internal/joblog"
	"github.com/ci-exec/ci-exec/internal/outcome"
	"github.com/ci-exec/ci-exec/internal/proc"
)

// reap is `ci-exec reap [--grace D] -- ARGV...`: the batch script's wrapper
// around the stage command on a compute node (see internal/batch/reap.go).
// It runs ARGV as a child subreaper with this process's environment and
// exits with its status, after ending whatever ARGV left running there —
// Slurm's proctrack/linuxproc does not follow a process that left with
// setsid. What it stopped goes into the job's output as the one job-log
// line the local stages write.
func reap(ctx context.Context, args []string, stderr io.Writer) int {
	flags := flag.NewFlagSet("ci-exec reap", flag.ContinueOnError)
	flags.SetOutput(stderr)
	grace := flags.Duration("grace", 10*time.Second, "time between SIGTERM and SIGKILL when the stage is cancelled")
	var helpers []string
	flags.Func("helper", "a runtime's own process name: ended, not named as the script's (repeatable)", func(s string) error {
		helpers = append(helpers, s)
		return nil
	})
	if err := flags.Parse(args); err != nil {
		return 2
	}
	argv := flags.Args()
	if len(argv) == 0 {
		fmt.Fprintln(stderr, "ERROR: ci-exec reap needs the command to run after --")
		return 2
	}
	log := joblog.New(stderr)
	if err := proc.BecomeSubreaper(); err != nil {
		log.Warnf("ci-exec reap could not become a child subreaper (%v): processes the script starts with setsid may outlive it", err)
	}
	// Descriptor 3 is the stage's start signal (package outcome): the
	// command must get it as the batch script gave it to us.
	var extra []*os.File
	if f := os.NewFile(uintptr(outcome.StartFD), "start-signal"); f != nil {
		if _, err := f.Stat(); err == nil {
			extra = []*os.File{f}
		}
	}
	res, err := proc.Run(ctx, proc.Cmd{Argv: argv, Env: os.Environ(), Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr, Grace: *grace, ExtraFiles: extra})
	var se *proc.StartError
	switch {
	case errors.As(err, &se):
		// What sh says and returns for a command it cannot run, so the
		// stage's diagnosis reads the same with and without the wrapper.
		fmt.Fprintf(stderr, "ci-exec reap: %v\n", err)
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, exec.ErrNotFound) {
			return 127
		}
		return 126
	case err != nil:
		fmt.Fprintf(stderr, "ci-exec reap: %v\n", err)
	}
	var left []string
	for _, n := range append(res.LeftBehind, proc.KillOrphans()...) {
		if !slices.Contains(helpers, n) {
			left = append(left, n)
		}
	}
	if len(left) > 0 {
		log.Printf("%s", proc.Summary(left))
	}
	if len(res.Survivors) > 0 {
		log.Warnf("could not stop %d process(es) the stage left running: %s", len(res.Survivors), strings.Join(res.Survivors, ", "))
	}
	return res.ExitCode
}
