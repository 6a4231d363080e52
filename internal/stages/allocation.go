package stages

// The job's Slurm allocation (batch.allocate = "prepare"): submitted in
// prepare, used by every user-script stage, released once no user-script
// stage is left (or the clone failed, or cleanup runs). See
// internal/batch/alloc.go and docs/slurm.md.

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ci-exec/ci-exec/internal/batch"
	"github.com/ci-exec/ci-exec/internal/failure"
)

// allocationDir is the queue dir in the job's state dir: on shared storage
// (the data dir), and out of the job's containers' sight.
const allocationDir = "slurm"

// identity is this CI job as its Slurm jobs' comment carries it.
func identity(st *Stage) batch.Identity {
	v := func(k string) string {
		if x, ok := st.Job.TrustedVar(k); ok {
			return x
		}
		return st.Job.Vars[k]
	}
	project := v("CI_PROJECT_PATH")
	if r := st.Job.Response; r != nil && r.JobInfo.ProjectFullPath != "" {
		project = r.JobInfo.ProjectFullPath
	}
	return batch.Identity{
		JobID:    st.Job.ID(),
		Pipeline: v("CI_PIPELINE_ID"),
		Project:  project,
		Runner:   v("CI_RUNNER_SHORT_TOKEN"),
		StateDir: st.Layout.StateDir,
	}
}

// submitAllocation submits the job's allocation and records it in the
// job's state, so that the run stages use it and cleanup ends it.
func submitAllocation(ctx context.Context, st *Stage, userArgs []string) (*batch.Allocation, error) {
	b := st.Cfg.Batch
	spec := batch.SubmitSpec{
		JobName:      batch.JobName(st.Job.ID(), "alloc"),
		AdminOptions: b.Options,
		UserArgs:     userArgs,
		Comment:      identity(st).Comment(),
	}
	s := newSlurm(st)
	st.Log.Printf("Submitting the job's Slurm allocation (its user scripts run in it): sbatch %s",
		strings.Join(batch.SbatchArgs(batch.SubmitSpec{JobName: spec.JobName, AdminOptions: spec.AdminOptions,
			UserArgs: spec.UserArgs, Comment: spec.Comment, Output: "<state>/agent.out", Chdir: "<state>"}), " "))
	a, err := s.Allocate(ctx, spec, slurmEnv(st), filepath.Join(st.Layout.StateDir, allocationDir), b.IdleLimit.Duration)
	if err != nil {
		if f := submitFailure(st, err); f != nil {
			return nil, f
		}
		return nil, failure.AsSystem(err)
	}
	st.Log.Printf("Submitted Slurm allocation %s (%s); it waits in the queue while the job's sources, caches and artifacts are fetched.", a.ID, a.Name)
	if err := saveAllocation(st, a); err != nil {
		// Without a record no stage could use it and cleanup could not
		// end it: end it now.
		_ = s.Release(context.WithoutCancel(ctx), a)
		return nil, failure.AsSystem(err)
	}
	return a, nil
}

// saveAllocation records a in the job's state, keeping what else is there.
func saveAllocation(st *Stage, a *batch.Allocation) error {
	state, err := st.loadState()
	if errors.Is(err, ErrNoState) {
		state, err = &State{}, nil
	}
	if err != nil {
		return err
	}
	state.Allocation = a
	return st.saveState(state)
}

// allocation is the job's allocation from its state, or nil.
func allocation(st *Stage) (*State, *batch.Allocation) {
	state, err := st.loadState()
	if err != nil || state.Allocation == nil {
		return nil, nil
	}
	return state, state.Allocation
}

// liveAllocation is the job's allocation unless it was released.
func liveAllocation(st *Stage) *batch.Allocation {
	if _, a := allocation(st); a != nil && !a.Released {
		return a
	}
	return nil
}

// releaseAllocation ends the job's allocation, if it has one still
// running, and records that.
func releaseAllocation(ctx context.Context, st *Stage, why string) {
	state, a := allocation(st)
	if a == nil || a.Released {
		return
	}
	if err := newSlurm(st).Release(context.WithoutCancel(ctx), a); err != nil {
		st.Log.Warnf("could not end Slurm allocation %s (%v); `ci-exec sweep` will cancel it later", a.ID, err)
		return
	}
	st.Log.Printf("Ended Slurm allocation %s: %s.", a.ID, why)
	a.Released = true
	if err := st.saveState(state); err != nil {
		st.Log.Warnf("%v", err)
	}
}

// markAllocationEnded records that the allocation has ended without
// being released.
func markAllocationEnded(st *Stage) {
	state, a := allocation(st)
	if a == nil || a.Released {
		return
	}
	a.Released = true
	if err := st.saveState(state); err != nil {
		st.Log.Warnf("%v", err)
	}
}

// afterUserScripts are the stages that come after the last user-script
// stage: once one starts, the allocation has nothing left to run.
var afterUserScripts = map[string]bool{
	"after_script": true, "archive_cache": true, "archive_cache_on_failure": true,
	"upload_artifacts_on_success": true, "upload_artifacts_on_failure": true, "cleanup_file_variables": true,
}

// attemptsVariable is the runner's retry count for a stage whose failure
// fails the job before any user script runs.
var attemptsVariable = map[string]string{
	"get_sources": "GET_SOURCES_ATTEMPTS", "download_artifacts": "ARTIFACT_DOWNLOAD_ATTEMPTS",
}

// allocationBefore releases the allocation when stage shows that no
// user-script stage is left.
func allocationBefore(ctx context.Context, st *Stage, stage string) {
	if st.Cfg.IsBatch() && afterUserScripts[stage] {
		releaseAllocation(ctx, st, "no user-script stage is left")
	}
}

// allocationAfter releases the allocation at once when a stage the runner
// does not retry failed before any user script (the clone, the artifact
// download): the job is over, and the allocation would hold its nodes
// until cleanup. With retries configured the last stages release it.
func allocationAfter(ctx context.Context, st *Stage, stage string, err error) {
	v, ok := attemptsVariable[stage]
	if !st.Cfg.IsBatch() || !ok || err == nil {
		return
	}
	if n, perr := strconv.Atoi(st.Job.Vars[v]); perr == nil && n > 1 {
		return
	}
	releaseAllocation(ctx, st, stage+" failed")
}

// jobLockFile, in the job's state dir, is held (shared) by every ci-exec
// stage of a Slurm job while it runs, and its time is that of the last
// stage's start or end: `ci-exec sweep` takes a CI job whose lock is free
// and stale for gone (its runner or driver died).
const jobLockFile = "slurm.lock"

// holdJobLock takes the job's lock for this stage; the returned function
// releases it. Only with a Slurm executor.
func holdJobLock(st *Stage) func() {
	if st.Cfg == nil || !st.Cfg.IsBatch() {
		return func() {}
	}
	p := filepath.Join(st.Layout.StateDir, jobLockFile)
	f, err := os.OpenFile(p, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return func() {}
	}
	now := time.Now()
	_ = os.Chtimes(p, now, now)
	_ = syscall.Flock(int(f.Fd()), syscall.LOCK_SH)
	return func() {
		now := time.Now()
		_ = os.Chtimes(p, now, now)
		_ = f.Close()
	}
}
