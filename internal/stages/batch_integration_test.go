package stages_test

// Integration tests of the Slurm batch executor: the built ci-exec, driven
// by the runner double, submits to the real single-node Slurm cluster that
// scripts/test-env.sh starts, as the unprivileged test user (and root for
// the basic job).

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/runnerdouble"
	"github.com/ci-exec/ci-exec/internal/testenv"
)

// batchJobID gives every test job its own CI job id, hence its own Slurm
// job name ci-<id>-<stage>, so leftovers can be looked up by name.
var batchJobID atomic.Int64

func init() { batchJobID.Store(time.Now().Unix() % 1000000 * 100) }

// slurmRunner writes a config with executor = "slurm" (extra lines for
// [general] and [batch]) and returns a runner double running ci-exec as u.
func slurmRunner(t *testing.T, u testenv.User, general, batchTable string) (runnerdouble.Config, string) {
	t.Helper()
	testenv.RequireBinary(t, "sbatch")
	requireSlurmUp(t)
	dir := testenv.PrivateDir(t, u)
	data := filepath.Join(dir, "data")
	cfg := fmt.Sprintf("[general]\ndata_dir = %q\nexecutor = \"slurm\"\nkill_timeout = \"10s\"\n%s\n[batch]\n%s\n", data+"/$USER", general, batchTable)
	path := testenv.WriteConfig(t, dir, cfg)
	t.Logf("config:\n%s", cfg)
	return runnerConfig(t, u, path, dir), dir
}

func requireSlurmUp(t *testing.T) {
	t.Helper()
	out, err := exec.Command("sinfo", "-h", "-o", "%T").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "idle") && !strings.Contains(string(out), "mix") && !strings.Contains(string(out), "alloc") {
		testenv.Missing(t, "Slurm is not up (sinfo: %v: %s)", err, out)
	}
}

// batchJob is a job with its own CI job id.
func batchJob() runnerdouble.Job {
	return runnerdouble.Job{ID: batchJobID.Add(1)}
}

// assertNoSlurmJob fails if Slurm still lists a job of this CI job (its
// allocation or its build_script job).
func assertNoSlurmJob(t *testing.T, j runnerdouble.Job) {
	t.Helper()
	name := fmt.Sprintf("ci-%d-build_script,ci-%d-alloc", j.ID, j.ID)
	var out []byte
	ok := assert.Eventually(t, func() bool {
		out, _ = exec.Command("squeue", "-h", "-n", name, "-o", "%i %T").CombinedOutput()
		return len(bytes.TrimSpace(out)) == 0
	}, 30*time.Second, 200*time.Millisecond)
	if !ok {
		t.Errorf("squeue still lists %s: %s", name, out)
		for _, n := range strings.Split(name, ",") {
			_ = exec.Command("scancel", "-n", n).Run()
		}
	}
}

func TestBatchJob(t *testing.T) {
	for _, u := range testenv.Users(t) {
		t.Run(u.Name, func(t *testing.T) {
			c, _ := slurmRunner(t, u, "", "")
			t.Run("success", func(t *testing.T) {
				j := batchJob()
				j.Variables = map[string]string{"GREETING": "hello from the node"}
				j.Script = []string{`echo "$GREETING"`, `echo "slurm job=$SLURM_JOB_ID name=$SLURM_JOB_NAME uid=$(id -u)"`, `echo made-on-node > node.txt`}
				j.AfterScript = []string{`echo "after slurm job=[${SLURM_JOB_ID:-}]"`}
				res := runJob(t, c, j)
				require.True(t, res.Succeeded(), res.Error)
				assert.Contains(t, res.Log, "hello from the node")
				assert.Regexp(t, fmt.Sprintf(`slurm job=[0-9]+ name=ci-%d-alloc uid=%d`, j.ID, u.UID), res.Log, "the stage ran in the job's allocation")
				assert.Contains(t, res.Log, "after slurm job=[]", "after_script runs on the login node, not in Slurm")
				assert.NotContains(t, res.Log, "__CI_EXEC_BATCH_END__", "the end marker is not part of the job's output")
				fi, err := os.Stat(filepath.Join(res.ProjectDir, "node.txt"))
				require.NoError(t, err)
				assert.Equal(t, uint32(u.UID), fi.Sys().(*syscall.Stat_t).Uid)
				assertNoSlurmJob(t, j)
			})
			t.Run("exit 7", func(t *testing.T) {
				j := batchJob()
				j.Script = []string{"echo before-exit", "exit 7"}
				res := runJob(t, c, j)
				assert.Equal(t, runnerdouble.ReasonScriptFailure, res.FailureReason)
				assert.Equal(t, 7, res.ExitCode)
				assert.Contains(t, res.Log, "before-exit")
				assertNoSlurmJob(t, j)
			})
		})
	}
}

// releaseOnLine is a live-log writer that creates a file (release, if
// set) and closes seen (if set) as soon as the line want reaches the job
// log.
type releaseOnLine struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	want    string
	release string
	seen    chan struct{}
	done    bool
}

func (r *releaseOnLine) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.buf.Write(p)
	if !r.done {
		for _, line := range strings.Split(r.buf.String(), "\n") {
			if line == r.want { // the output itself, not the "$ echo ..." line
				r.done = true
				if r.release != "" {
					_ = os.WriteFile(r.release, []byte("go"), 0o644)
				}
				if r.seen != nil {
					close(r.seen)
				}
				break
			}
		}
	}
	return len(p), nil
}

func TestBatchLiveLog(t *testing.T) {
	u := testenv.Unprivileged(t)
	c, dir := slurmRunner(t, u, "", "")
	release := filepath.Join(dir, "release")
	// The job waits until the runner has seen its first line: if the output
	// were only copied at the end, it would never be released and would hit
	// the job timeout.
	live := &releaseOnLine{want: "first-line-of-output", release: release}
	c.LiveLog = live
	j := batchJob()
	j.Timeout = 90 * time.Second
	j.Script = []string{"echo first-line-of-output", fmt.Sprintf("while [ ! -e %s ]; do sleep 0.2; done", release), "echo released"}
	res := runJob(t, c, j)
	require.True(t, res.Succeeded(), "the first line did not reach the log while the job ran: %s", res.Error)
	assert.Contains(t, res.Log, "released")
	assertNoSlurmJob(t, j)
}

func TestBatchCancelRunning(t *testing.T) {
	u := testenv.Unprivileged(t)
	c, _ := slurmRunner(t, u, "", "")
	marker := fmt.Sprintf("CI_EXEC_MARKER_%d", time.Now().UnixNano())
	j := batchJob()
	j.Variables = map[string]string{"PROC_MARKER": marker}
	j.Script = []string{`trap 'echo "batch script got TERM"; exit 143' TERM`, `echo started`, `sleep 1000 & wait`}
	j.AfterScript = []string{`echo "after status=$CI_JOB_STATUS"`}
	j.CancelOnLog = "started"
	res := runJob(t, c, j)
	assert.Equal(t, runnerdouble.InternalReasonJobCanceled, res.InternalFailureReason)
	assert.Contains(t, res.Log, "Cancelling Slurm job")
	assert.Contains(t, res.Log, "batch script got TERM", "scancel lets the job's TERM trap run")
	assert.Contains(t, res.Log, "after status=canceled")
	build := res.Call("build_script")
	require.NotNil(t, build)
	assert.False(t, build.ForceKilled, "ci-exec ended within the runner's grace period")
	assertNoSlurmJob(t, j)
	noProcessWith(t, marker)
}

func TestBatchCancelPending(t *testing.T) {
	u := testenv.Unprivileged(t)
	// --hold: the job pends until released, which never happens.
	c, _ := slurmRunner(t, u, "", `options = ["--hold"]`)
	j := batchJob()
	j.Script = []string{"echo must-not-run"}
	j.AfterScript = []string{`echo "after status=$CI_JOB_STATUS"`}
	j.CancelOnLog = "output is streamed below"
	res := runJob(t, c, j)
	assert.Equal(t, runnerdouble.InternalReasonJobCanceled, res.InternalFailureReason)
	assert.Contains(t, res.Log, "Cancelling Slurm job")
	assert.NotContains(t, res.Log, "\nmust-not-run")
	assert.Contains(t, res.Log, "after status=canceled")
	assertNoSlurmJob(t, j)
}

func TestBatchPendingLimit(t *testing.T) {
	u := testenv.Unprivileged(t)
	c, _ := slurmRunner(t, u, "", "options = [\"--hold\"]\npending_limit = \"3s\"")
	j := batchJob()
	j.Script = []string{"echo must-not-run"}
	res := runJob(t, c, j)
	assert.Equal(t, runnerdouble.ReasonRunnerSystemFailure, res.FailureReason)
	assert.Contains(t, res.Log, "still pending after batch.pending_limit (3s)")
	assert.Regexp(t, `reason JobHeld(User|Admin)`, res.Log, "the log gives Slurm's pending reason")
	assertNoSlurmJob(t, j)
}

func TestBatchTimeLimit(t *testing.T) {
	u := testenv.Unprivileged(t)
	c, _ := slurmRunner(t, u, "", "")
	j := batchJob()
	j.Timeout = 5 * time.Minute
	// Slurm's smallest time limit is one minute, checked about every 30 s.
	j.Variables = map[string]string{"SCHEDULER_PARAMETERS": "--time=1"}
	j.Script = []string{"echo started", "sleep 600"}
	res := runJob(t, c, j)
	assert.Equal(t, runnerdouble.ReasonScriptFailure, res.FailureReason)
	assert.Contains(t, res.Log, "reached its time limit")
	assertNoSlurmJob(t, j)
}

func TestBatchSchedulerParameters(t *testing.T) {
	u := testenv.Unprivileged(t)
	c, _ := slurmRunner(t, u, "", "")
	t.Run("allowed", func(t *testing.T) {
		j := batchJob()
		j.Variables = map[string]string{"SCHEDULER_PARAMETERS": `--time=5 -n 1 --comment="ci job"`}
		j.Script = []string{`echo "tasks=$SLURM_NTASKS"`}
		res := runJob(t, c, j)
		require.True(t, res.Succeeded(), res.Error)
		assert.Contains(t, res.Log, "tasks=1")
		assertNoSlurmJob(t, j)
	})
	for name, c2 := range map[string]struct{ params, want string }{
		"owned option":        {"--output=/tmp/elsewhere", "set by ci-exec"},
		"denied option":       {"--uid=0", "not allowed"},
		"denied short option": {"-H", "not allowed"},
		"positional word":     {"--time=5 other.sh", "not an sbatch option"},
		"missing value":       {"--nodes", "needs a value"},
		"unknown option":      {"--bogus=1", "not an sbatch option"},
		"abbreviation":        {"--out=/tmp/x", "write options in full"},
		"unbalanced quote":    {`--comment="x`, "check its quotes"},
		"refused by Slurm":    {"--partition=no-such-partition", "Slurm refused the job"},
		"shell syntax":        {"--time=5; touch /tmp/pwned-by-ci", "not an sbatch option"},
		"other cluster":       {"-M other", "sends the job to another Slurm cluster"},
		"other clusters":      {"--clusters=a,b", "sends the job to another Slurm cluster"},
	} {
		t.Run(name, func(t *testing.T) {
			j := batchJob()
			j.Variables = map[string]string{"SCHEDULER_PARAMETERS": c2.params}
			j.Script = []string{"echo must-not-run"}
			res := runJob(t, c, j)
			assertUserFailure(t, res, c2.want)
			assert.NotContains(t, res.Log, "\nmust-not-run")
			assertNoSlurmJob(t, j)
		})
	}
	_, err := os.Stat("/tmp/pwned-by-ci")
	assert.ErrorIs(t, err, os.ErrNotExist)
}

func TestBatchInContainer(t *testing.T) {
	for _, rt := range runtimes(t) {
		t.Run(rt.name, func(t *testing.T) {
			testenv.RequireBinary(t, rt.program)
			u := testenv.Unprivileged(t)
			e := containerRunner(t, rt, u, `executor = "slurm"`, "")
			j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
			j.ID = batchJobID.Add(1)
			j.Script = []string{`grep '^ID=' /etc/os-release`, `echo "slurm job=$SLURM_JOB_ID"`, `echo from-node > node.txt`}
			j.AfterScript = []string{`grep '^ID=' /etc/os-release | sed 's/^/after: /'`}
			res := runJob(t, e.runner, j)
			require.True(t, res.Succeeded(), res.Error)
			assert.Contains(t, res.Log, "ID=citiny")
			if rt.name == "charliecloud" {
				assert.Regexp(t, `slurm job=[0-9]+`, res.Log, "ch-run passes Slurm's variables into the container")
			} else {
				assert.Contains(t, res.Log, "slurm job=\n", "apptainer --cleanenv keeps Slurm's variables out (docs/slurm.md)")
			}
			assert.Contains(t, res.Log, "after: ID=citiny")
			assert.Contains(t, res.Log, "Submitted Slurm allocation")
			assert.Contains(t, res.Log, "in Slurm allocation", "the stage ran in the allocation")
			fi, err := os.Stat(filepath.Join(res.ProjectDir, "node.txt"))
			require.NoError(t, err)
			assert.Equal(t, uint32(u.UID), fi.Sys().(*syscall.Stat_t).Uid)
			assertNoSlurmJob(t, j)
		})
	}
}
