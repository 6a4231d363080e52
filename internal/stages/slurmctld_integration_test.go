package stages_test

// Faults of the Slurm controller, for real: slurmctld is stopped and
// started by the test (testenv.TakeSlurmctld serialises such tests across
// processes and always starts it again). Kept short: other tests share the
// cluster.

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/runnerdouble"
	"github.com/ci-exec/ci-exec/internal/testenv"
)

// lineEvents is a live-log writer that closes the channel of each
// substring once a line containing it reaches the job log.
type lineEvents struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	wait map[string]chan struct{}
}

func newLineEvents(subs ...string) *lineEvents {
	e := &lineEvents{wait: map[string]chan struct{}{}}
	for _, s := range subs {
		e.wait[s] = make(chan struct{})
	}
	return e
}

func (e *lineEvents) Write(p []byte) (int, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.buf.Write(p)
	for s, ch := range e.wait {
		if ch != nil && strings.Contains(e.buf.String(), s) {
			close(ch)
			e.wait[s] = nil
		}
	}
	return len(p), nil
}

// on returns the channel for s (closed once seen).
func (e *lineEvents) on(s string) <-chan struct{} {
	e.mu.Lock()
	defer e.mu.Unlock()
	if ch := e.wait[s]; ch != nil {
		return ch
	}
	ch := make(chan struct{})
	close(ch)
	return ch
}

// await waits for s in the log, or for the job to end first (a failure).
func await(t *testing.T, e *lineEvents, s string, done <-chan struct{}) bool {
	t.Helper()
	select {
	case <-e.on(s):
		return true
	case <-done:
		t.Errorf("the job ended before its log said %q", s)
		return false
	case <-time.After(2 * time.Minute):
		t.Errorf("no %q in the job log within 2 minutes", s)
		return false
	}
}

func TestSlurmctld(t *testing.T) {
	u := testenv.Unprivileged(t)
	testenv.RequireBinary(t, "sbatch")
	requireSlurmUp(t)
	ctl := testenv.TakeSlurmctld(t)

	t.Run("down at submit", func(t *testing.T) {
		dir := testenv.PrivateDir(t, u)
		cfg := testenv.WriteConfig(t, dir, fmt.Sprintf("[general]\ndata_dir = %q\nexecutor = \"slurm\"\n", filepath.Join(dir, "data", "$USER")))
		prepare := driverJob(t, u, cfg, dir, batchJobID.Add(1))("prepare")
		ctl.Stop()
		out, err := prepare.CombinedOutput()
		ctl.Start()
		t.Logf("prepare:\n%s", out)
		require.Error(t, err)
		assert.Equal(t, 2, prepare.ProcessState.ExitCode(), "a system failure (SYSTEM_FAILURE_EXIT_CODE): the runner retries prepare")
		assert.Equal(t, 1, strings.Count(string(out), "ERROR"), "one error line")
		assert.Contains(t, string(out), "ERROR: ci-exec: could not submit to Slurm: sbatch: error: Batch job submission failed: Unable to contact slurm controller")
	})

	t.Run("restarted mid-job", func(t *testing.T) {
		c, dir := slurmRunner(t, u, "", "")
		release := filepath.Join(dir, "release")
		ev := newLineEvents("started-on-node")
		c.LiveLog = ev
		j := batchJob()
		j.Script = []string{"echo started-on-node", fmt.Sprintf("while [ ! -e %s ]; do sleep 0.2; done", release), "echo finished-on-node"}
		done := make(chan struct{})
		var res *runnerdouble.Result
		var runErr error
		go func() { defer close(done); res, runErr = runJobErr(t, c, j) }()
		if await(t, ev, "started-on-node", done) {
			ctl.Stop()
			ctl.Start()
			require.NoError(t, os.WriteFile(release, nil, 0o644))
		}
		<-done
		require.NoError(t, runErr)
		require.True(t, res.Succeeded(), res.Error)
		assert.Contains(t, res.Log, "finished-on-node")
		assertNoSlurmJob(t, j)
	})

	t.Run("unknown_state_limit", func(t *testing.T) {
		c, _ := slurmRunner(t, u, "", `unknown_state_limit = "3s"`)
		ev := newLineEvents("started-on-node", "Slurm could not be asked about job")
		c.LiveLog = ev
		j := batchJob()
		j.Script = []string{"echo started-on-node", "sleep 600"}
		done := make(chan struct{})
		var res *runnerdouble.Result
		var runErr error
		go func() { defer close(done); res, runErr = runJobErr(t, c, j) }()
		if await(t, ev, "started-on-node", done) {
			ctl.Stop()
			// Up again once ci-exec has given up on it: its scancel (which
			// waits for the controller) then reaches it.
			await(t, ev, "Slurm could not be asked about job", done)
			ctl.Start()
		}
		<-done
		require.NoError(t, runErr)
		assert.Equal(t, runnerdouble.ReasonRunnerSystemFailure, res.FailureReason)
		assert.Regexp(t, `Slurm could not be asked about job [0-9]+ for 3s \(batch.unknown_state_limit: .*\); cancelling it \(scancel\)`, res.Log)
		assertNoSlurmJob(t, j)
	})
}
