package stages_test

// Integration tests of the job's Slurm allocation (batch.allocate =
// "prepare", the default) on the real single-node cluster: submitted at
// prepare, every user-script stage in it, released when no user-script
// stage is left, found again by its identity.

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/runnerdouble"
	"github.com/ci-exec/ci-exec/internal/testenv"
)

var allocIDRE = regexp.MustCompile(`Submitted Slurm allocation ([0-9]+) `)

// allocationID is the allocation the job log names.
func allocationID(t *testing.T, log string) string {
	t.Helper()
	m := allocIDRE.FindStringSubmatch(log)
	require.NotNil(t, m, "the log names the job's allocation")
	return m[1]
}

// squeueState is the job's state as squeue lists it ("" once gone).
func squeueState(id string) string {
	out, _ := exec.Command("squeue", "-h", "-j", id, "-o", "%T").Output()
	return strings.TrimSpace(string(out))
}

func TestAllocationSteps(t *testing.T) {
	u := testenv.Unprivileged(t)
	c, _ := slurmRunner(t, u, "", "")
	j := batchJob()
	j.Steps = []runnerdouble.Step{
		{Name: "script", Script: []string{`echo "stage=build job=$SLURM_JOB_ID"`,
			`scontrol show job -o "$SLURM_JOB_ID" | grep -o 'Comment=ci-exec job=[0-9]* pipeline=[0-9]* project=[^ ]* runner=[^ ]*'`}},
		{Name: "release", Script: []string{`echo "stage=release job=$SLURM_JOB_ID"`}},
		{Name: "deploy", Script: []string{`echo "stage=deploy job=$SLURM_JOB_ID"`}},
		{Name: "after_script", Script: []string{`echo "after job=[${SLURM_JOB_ID:-}]"`}},
	}
	res := runJob(t, c, j)
	require.True(t, res.Succeeded(), res.Error)
	id := allocationID(t, res.Log)
	assert.Contains(t, res.Log, "stage=build job="+id+"\n")
	assert.Contains(t, res.Log, "stage=release job="+id+"\n", "step_release ran in the same Slurm job")
	assert.Contains(t, res.Log, "stage=deploy job="+id+"\n", "and step_deploy")
	assert.Contains(t, res.Log, fmt.Sprintf("Comment=ci-exec job=%d pipeline=1 project=demo-group/demo runner=t3stt0k3n\n", j.ID),
		"scontrol show job carries the CI job's identity")
	assert.Contains(t, res.Log, "after job=[]\n", "after_script runs on the login node")
	assert.Contains(t, res.Log, fmt.Sprintf("Ended Slurm allocation %s: no user-script stage is left.", id))
	assert.NotContains(t, res.Log, "Submitting build_script", "no per-stage submission")
	assertNoSlurmJob(t, j)
}

// holdOnLine is a live-log writer that, when a line containing want
// reaches the job log, blocks the runner (the stage's output is copied
// before the stage counts as done) until until() returns true.
type holdOnLine struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	want  string
	until func(log string) bool
	// limit is how long to hold at most (0: 60 s).
	limit time.Duration
	held  bool
	ok    bool
}

func (h *holdOnLine) Write(p []byte) (int, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.buf.Write(p)
	if !h.held && strings.Contains(h.buf.String(), h.want) {
		h.held = true
		limit := h.limit
		if limit == 0 {
			limit = 60 * time.Second
		}
		deadline := time.Now().Add(limit)
		for !h.until(h.buf.String()) && time.Now().Before(deadline) {
			time.Sleep(100 * time.Millisecond)
		}
		h.ok = h.until(h.buf.String())
	}
	return len(p), nil
}

// The allocation submitted at prepare runs while the runner fetches the
// sources: the build stage starts in a RUNNING allocation, with no wait.
func TestAllocationRunsDuringGetSources(t *testing.T) {
	u := testenv.Unprivileged(t)
	c, _ := slurmRunner(t, u, "", "")
	h := &holdOnLine{want: "Getting source from Git repository", until: func(log string) bool {
		m := allocIDRE.FindStringSubmatch(log)
		return m != nil && squeueState(m[1]) == "RUNNING"
	}}
	c.LiveLog = h
	j := batchJob()
	j.Script = []string{`echo "build in $SLURM_JOB_ID"`}
	res := runJob(t, c, j)
	require.True(t, res.Succeeded(), res.Error)
	assert.True(t, h.ok, "the allocation was RUNNING while get_sources ran")
	id := allocationID(t, res.Log)
	assert.Contains(t, res.Log, "build in "+id+"\n")
	assert.NotContains(t, res.Log, "is PENDING")
	assertNoSlurmJob(t, j)
}

// A pending allocation says why every ~30 s; cancelling the job leaves
// nothing in the queue.
func TestAllocationPendingReasonAndCancel(t *testing.T) {
	u := testenv.Unprivileged(t)
	c, _ := slurmRunner(t, u, "", "")
	j := batchJob()
	j.Variables = map[string]string{"SCHEDULER_PARAMETERS": "--begin=now+1hour"}
	j.Script = []string{"echo must-not-run"}
	j.AfterScript = []string{`echo "after status=$CI_JOB_STATUS"`}
	j.CancelOnLog = "is PENDING for"
	res := runJob(t, c, j)
	assert.Equal(t, runnerdouble.InternalReasonJobCanceled, res.InternalFailureReason)
	assert.Regexp(t, `Slurm job [0-9]+ is PENDING for [0-9]+s \(reason: BeginTime\)`, res.Log)
	assert.NotContains(t, res.Log, "\nmust-not-run")
	assert.Contains(t, res.Log, "after status=canceled")
	assertNoSlurmJob(t, j)
}

// A job whose clone fails ends its allocation at once.
func TestAllocationCloneFails(t *testing.T) {
	u := testenv.Unprivileged(t)
	c, _ := slurmRunner(t, u, "", "")
	j := batchJob()
	j.GitStrategy = "clone"
	j.RepoURL = "http://127.0.0.1:1/no/such/repo.git"
	j.Script = []string{"echo must-not-run"}
	res := runJob(t, c, j)
	assert.False(t, res.Succeeded())
	id := allocationID(t, res.Log)
	assert.Contains(t, res.Log, fmt.Sprintf("Ended Slurm allocation %s: get_sources failed.", id))
	assert.NotContains(t, res.Log, "\nmust-not-run")
	assertNoSlurmJob(t, j)
}

// An allocation with nothing to run ends after idle_limit; the next stage
// then gets a job of its own.
func TestAllocationIdleLimit(t *testing.T) {
	u := testenv.Unprivileged(t)
	c, _ := slurmRunner(t, u, "", `idle_limit = "1s"`)
	h := &holdOnLine{want: "Getting source from Git repository", until: func(log string) bool {
		m := allocIDRE.FindStringSubmatch(log)
		return m != nil && squeueState(m[1]) == ""
	}}
	c.LiveLog = h
	j := batchJob()
	j.Script = []string{`echo "build in $SLURM_JOB_NAME"`}
	res := runJob(t, c, j)
	require.True(t, res.Succeeded(), res.Error)
	require.True(t, h.ok, "the idle allocation ended")
	assert.Regexp(t, `Slurm allocation [0-9]+ ended after batch.idle_limit without a stage to run; submitting build_script as a Slurm job of its own.`, res.Log)
	assert.Contains(t, res.Log, fmt.Sprintf("build in ci-%d-build_script\n", j.ID))
	assertNoSlurmJob(t, j)
}

// batch.allocate = "stage" submits one job per stage, as before.
func TestAllocateStage(t *testing.T) {
	u := testenv.Unprivileged(t)
	c, _ := slurmRunner(t, u, "", `allocate = "stage"`)
	j := batchJob()
	j.Script = []string{`echo "build in $SLURM_JOB_NAME"`}
	res := runJob(t, c, j)
	require.True(t, res.Succeeded(), res.Error)
	assert.Contains(t, res.Log, fmt.Sprintf("build in ci-%d-build_script\n", j.ID))
	assert.NotContains(t, res.Log, "Slurm allocation")
	assertNoSlurmJob(t, j)
}

// driverJob is one CI job's environment for calling the built ci-exec's
// stages directly, as a runner would (the sweep tests need a driver that
// is gone, not one the runner double still waits for).
func driverJob(t *testing.T, u testenv.User, cfg, dir string, id int64) func(args ...string) *exec.Cmd {
	t.Helper()
	response := filepath.Join(dir, fmt.Sprintf("response-%d.json", id))
	require.NoError(t, os.WriteFile(response, []byte(fmt.Sprintf(`{"id":%d,"token":"sweeptoken123"}`, id)), 0o644))
	tmp := filepath.Join(dir, fmt.Sprintf("tmp-%d", id))
	require.NoError(t, os.MkdirAll(tmp, 0o700))
	testenv.Chown(t, tmp, u)
	env := []string{
		"PATH=/usr/local/bin:/usr/bin:/bin", "HOME=" + u.Home, "USER=" + u.Name, "TMPDIR=" + tmp,
		"BUILD_FAILURE_EXIT_CODE=1", "SYSTEM_FAILURE_EXIT_CODE=2", "JOB_RESPONSE_FILE=" + response,
		fmt.Sprintf("CUSTOM_ENV_CI_JOB_ID=%d", id), "CUSTOM_ENV_CI_RUNNER_SHORT_TOKEN=sweeper", "CUSTOM_ENV_CI_CONCURRENT_ID=0",
		"CUSTOM_ENV_CI_PIPELINE_ID=77", "CUSTOM_ENV_CI_PROJECT_PATH=group/sweep",
	}
	driver := testenv.Driver(t)
	return func(args ...string) *exec.Cmd {
		cmd := exec.Command(driver, append([]string{"--config", cfg}, args...)...)
		cmd.Env, cmd.Dir = env, tmp
		if os.Getuid() != u.UID {
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: u.Credential()}
		}
		return cmd
	}
}

// A prepare whose driver never comes back (the runner crashed) leaves its
// allocation; `ci-exec sweep` finds it by its identity and cancels it, and
// touches neither a live CI job's allocation nor the user's other jobs.
func TestSweep(t *testing.T) {
	u := testenv.Unprivileged(t)
	testenv.RequireBinary(t, "sbatch")
	requireSlurmUp(t)
	dir := testenv.PrivateDir(t, u)
	cfg := testenv.WriteConfig(t, dir, fmt.Sprintf("[general]\ndata_dir = %q\nexecutor = \"slurm\"\n", filepath.Join(dir, "data", "$USER")))

	gone, stale, live, other := batchJobID.Add(1), batchJobID.Add(1), batchJobID.Add(1), batchJobID.Add(1)
	for _, id := range []int64{gone, stale, live, other} {
		out, err := driverJob(t, u, cfg, dir, id)("prepare").CombinedOutput()
		require.NoError(t, err, "%s", out)
		require.Contains(t, string(out), "Submitted Slurm allocation")
	}
	t.Cleanup(func() {
		for _, id := range []int64{gone, stale, live, other} {
			_ = exec.Command("scancel", "-n", fmt.Sprintf("ci-%d-alloc", id)).Run()
		}
	})
	stateOf := func(id int64) string {
		return filepath.Join(dir, "data", u.Name, "state", "sweeper", "000", fmt.Sprint(id))
	}
	allocOf := func(id int64) string {
		o, _ := exec.Command("squeue", "-h", "-n", fmt.Sprintf("ci-%d-alloc", id), "-o", "%i").Output()
		return string(bytes.TrimSpace(o))
	}
	// stale: no stage of it for an hour.
	old := time.Now().Add(-time.Hour)
	require.NoError(t, os.Chtimes(filepath.Join(stateOf(stale), "slurm.lock"), old, old))
	// live: a stage of it holds the job's lock (a long build).
	stateDir := stateOf(live)
	lockHolder := exec.Command("flock", "-s", filepath.Join(stateDir, "slurm.lock"), "sleep", "600")
	lockHolder.SysProcAttr = &syscall.SysProcAttr{Credential: u.Credential()}
	require.NoError(t, lockHolder.Start())
	t.Cleanup(func() { _ = lockHolder.Process.Kill(); _ = lockHolder.Wait() })
	// The user's own job, not ci-exec's.
	own := exec.Command("sbatch", "--parsable", "-o", "/dev/null", "--wrap", "sleep 600")
	own.SysProcAttr = &syscall.SysProcAttr{Credential: u.Credential()}
	own.Dir = "/tmp"
	out, err := own.Output()
	require.NoError(t, err)
	ownID := strings.TrimSpace(string(out))
	t.Cleanup(func() { _ = exec.Command("scancel", ownID).Run() })

	// Another job's cleanup ends its own allocation and sweeps with the
	// default --stale (5m): only the stale one goes.
	out, err = driverJob(t, u, cfg, dir, other)("cleanup").CombinedOutput()
	require.NoError(t, err, "%s", out)
	t.Logf("cleanup:\n%s", out)
	assert.Regexp(t, fmt.Sprintf(`cancelled Slurm job [0-9]+ \((PENDING|RUNNING)\) of CI job %d \(project group/sweep, pipeline 77, runner sweeper\): no ci-exec stage of it for 1h`, stale), string(out))
	assert.NotContains(t, string(out), fmt.Sprintf("CI job %d ", gone), "a CI job with a recent stage is not gone")
	assert.Eventually(t, func() bool { return allocOf(stale) == "" && allocOf(other) == "" }, 30*time.Second, 200*time.Millisecond,
		"the stale job's allocation and the cleaned-up job's own were cancelled")
	assert.NotEmpty(t, allocOf(gone))

	// Wait until flock holds the lock (its child runs).
	require.Eventually(t, func() bool {
		return exec.Command("flock", "-n", "-x", filepath.Join(stateDir, "slurm.lock"), "true").Run() != nil
	}, 10*time.Second, 50*time.Millisecond)

	sw := driverJob(t, u, cfg, dir, gone)("sweep", "--stale=0s")
	sw.Env = []string{"PATH=/usr/bin:/bin", "HOME=" + u.Home, "USER=" + u.Name}
	outB, err := sw.CombinedOutput()
	require.NoError(t, err, "%s", outB)
	t.Logf("sweep:\n%s", outB)
	assert.Regexp(t, fmt.Sprintf(`cancelled Slurm job [0-9]+ \((PENDING|RUNNING)\) of CI job %d \(project group/sweep, pipeline 77, runner sweeper\): no ci-exec stage of it for`, gone), string(outB))
	assert.NotContains(t, string(outB), fmt.Sprintf("CI job %d ", live))
	assert.Eventually(t, func() bool { return allocOf(gone) == "" }, 30*time.Second, 200*time.Millisecond, "the gone job's allocation was cancelled")
	assert.NotEmpty(t, allocOf(live), "the live job's allocation is untouched")
	assert.NotEmpty(t, squeueState(ownID), "the user's own job is untouched")

	// Its cleanup ends the live job's allocation.
	out, err = driverJob(t, u, cfg, dir, live)("cleanup").CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Eventually(t, func() bool { return allocOf(live) == "" }, 30*time.Second, 200*time.Millisecond, "cleanup ended the allocation")
}

// An allocation whose --time runs out while the runner is still on the
// login node fails the job as the user's, and says where the time went.
func TestAllocationTimeLimitBeforeBuild(t *testing.T) {
	u := testenv.Unprivileged(t)
	c, _ := slurmRunner(t, u, "", "")
	h := &holdOnLine{want: "Getting source from Git repository", until: func(log string) bool {
		m := allocIDRE.FindStringSubmatch(log)
		return m != nil && squeueState(m[1]) == ""
	}}
	h.limit = 3 * time.Minute
	c.LiveLog = h
	j := batchJob()
	j.Timeout = 5 * time.Minute
	// Slurm's smallest time limit is one minute, checked about every 30 s.
	j.Variables = map[string]string{"SCHEDULER_PARAMETERS": "--time=1"}
	j.Script = []string{"echo must-not-run"}
	res := runJob(t, c, j)
	require.True(t, h.ok, "the allocation reached its time limit")
	assert.Equal(t, runnerdouble.ReasonScriptFailure, res.FailureReason)
	assert.Regexp(t, `Slurm allocation [0-9]+ reached its time limit before build_script began: its time counts from its start in prepare`, res.Log)
	assert.NotContains(t, res.Log, "\nmust-not-run")
	assertNoSlurmJob(t, j)
}
