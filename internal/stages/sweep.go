package stages

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/ci-exec/ci-exec/internal/batch"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/job"
)

// DefaultSweepStale is how long a CI job's lock must have been free and
// untouched before `ci-exec sweep` takes the job for gone. The runner
// calls its stages back to back, and a stage holds the lock while it
// runs, so a live job never looks like this for more than moments.
const DefaultSweepStale = 5 * time.Minute

// SweepOptions are `ci-exec sweep`'s flags.
type SweepOptions struct {
	// Stale: see DefaultSweepStale.
	Stale time.Duration
	// Runner, if set, limits the sweep to that runner's short token.
	Runner string
	// DryRun lists what would be cancelled.
	DryRun bool
}

// Sweep is `ci-exec sweep`: it cancels the calling user's Slurm jobs that
// ci-exec submitted for a CI job that is gone (its runner crashed, its
// driver was killed, its cleanup never ran), for a cron job or a systemd
// timer. Only jobs whose identity (the --comment, see batch.Identity)
// names a state dir under this configuration's data_dir are considered:
// another runner's jobs, or the user's own other jobs, are never touched.
// It returns the process exit code: 0, or 1 when Slurm could not be asked.
func Sweep(ctx context.Context, inv Invocation, o SweepOptions) int {
	name, home, err := job.CurrentUser()
	if err != nil {
		fmt.Fprintf(inv.Stderr, "ERROR: ci-exec sweep: %v\n", err)
		return 1
	}
	u := config.UserInfo{Name: name, Home: home}
	cfg, err := config.Load(inv.ConfigPath, u)
	if err != nil {
		fmt.Fprintf(inv.Stderr, "ERROR: ci-exec sweep: %v\n", err)
		return 1
	}
	if !cfg.IsBatch() {
		fmt.Fprintf(inv.Stderr, "ci-exec sweep: the executor is %q: nothing to sweep\n", cfg.General.Executor)
		return 0
	}
	env := []string{"PATH=" + systemPath, "HOME=" + home, "USER=" + name, "LANG=C.UTF-8"}
	if c := os.Getenv("SLURM_CONF"); c != "" {
		env = append(env, "SLURM_CONF="+c)
	}
	s := &batch.Slurm{Bin: cfg.Batch.SchedulerBin, Env: env, User: name,
		Logf: func(f string, a ...any) { fmt.Fprintf(inv.Stdout, f+"\n", a...) }}
	if err := sweep(ctx, s, filepath.Clean(cfg.General.DataDir), "", o, inv.Stdout); err != nil {
		fmt.Fprintf(inv.Stderr, "ERROR: ci-exec sweep: %v\n", err)
		return 1
	}
	return 0
}

// sweepGone is cleanup's sweep: the same as `ci-exec sweep`, for the other
// CI jobs of this user and data dir.
func sweepGone(ctx context.Context, st *Stage) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	defer cancel()
	s := newSlurm(st)
	if err := sweep(ctx, s, st.Layout.DataDir, st.Layout.StateDir, SweepOptions{Stale: DefaultSweepStale}, logWriter{st}); err != nil {
		st.Log.Warnf("cleanup: sweep for Slurm jobs of gone CI jobs: %v", err)
	}
}

type logWriter struct{ st *Stage }

func (w logWriter) Write(p []byte) (int, error) {
	w.st.Log.Printf("%s", strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// sweep cancels the listed jobs whose CI job is gone; skip is a state dir
// not to consider (the calling job's own).
func sweep(ctx context.Context, s *batch.Slurm, dataDir, skip string, o SweepOptions, out io.Writer) error {
	jobs, err := s.ListCI(ctx)
	if err != nil {
		return err
	}
	root := filepath.Join(dataDir, "state") + "/"
	for _, j := range jobs {
		sd := filepath.Clean(j.Identity.StateDir)
		if !strings.HasPrefix(sd, root) || sd == skip || o.Runner != "" && j.Identity.Runner != o.Runner {
			continue
		}
		why := goneReason(sd, o.Stale)
		if why == "" {
			continue
		}
		what := fmt.Sprintf("Slurm job %s (%s) of CI job %d (project %s, pipeline %s, runner %s): %s",
			j.ID, j.State, j.Identity.JobID, j.Identity.Project, j.Identity.Pipeline, j.Identity.Runner, why)
		if o.DryRun {
			fmt.Fprintf(out, "would cancel %s\n", what)
			continue
		}
		if err := s.Cancel(ctx, j.ID); err != nil {
			fmt.Fprintf(out, "could not cancel %s: %v\n", what, err)
			continue
		}
		fmt.Fprintf(out, "cancelled %s\n", what)
	}
	return nil
}

// goneReason says why the CI job of a state dir is gone, or "" while it
// may still be alive: a stage holds its lock, or one held it recently.
func goneReason(stateDir string, stale time.Duration) string {
	p := filepath.Join(stateDir, jobLockFile)
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if errors.Is(err, os.ErrNotExist) {
		if _, serr := os.Stat(stateDir); errors.Is(serr, os.ErrNotExist) {
			return "its state dir is gone (its cleanup ran, or its files were removed)"
		}
		fi, serr := os.Stat(stateDir)
		if serr == nil && time.Since(fi.ModTime()) > stale {
			return fmt.Sprintf("no ci-exec stage of it for %s", time.Since(fi.ModTime()).Round(time.Second))
		}
		return ""
	}
	if err != nil {
		return ""
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		// A stage of it is running.
		return ""
	}
	fi, err := f.Stat()
	if err != nil || time.Since(fi.ModTime()) <= stale {
		return ""
	}
	return fmt.Sprintf("no ci-exec stage of it for %s", time.Since(fi.ModTime()).Round(time.Second))
}
