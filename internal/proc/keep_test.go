package proc

import (
	"context"
	"os/exec"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestKeptIsNotALeftover: a process started with StartKept (a job's
// service) survives the leftover ending of a later Run and KillOrphans,
// which both end everything else below this subreaper.
func TestKeptIsNotALeftover(t *testing.T) {
	svc := exec.Command("sleep", "300")
	require.NoError(t, StartKept(svc))
	pid := svc.Process.Pid
	defer func() {
		_ = syscall.Kill(pid, syscall.SIGKILL)
		_ = svc.Wait()
		kept.Lock()
		delete(kept.pids, pid)
		kept.Unlock()
	}()
	other := exec.Command("sleep", "300")
	require.NoError(t, other.Start())
	defer func() {
		_ = syscall.Kill(other.Process.Pid, syscall.SIGKILL)
		_ = other.Wait()
	}()

	res, err := Run(context.Background(), Cmd{Argv: []string{"true"}})
	require.NoError(t, err)
	assert.Contains(t, res.LeftBehind, "sleep", "the other child is a leftover")
	p, ok := readStat(pid)
	require.True(t, ok)
	assert.False(t, p.dead(), "the kept process still runs after Run")

	KillOrphans()
	p, ok = readStat(pid)
	require.True(t, ok)
	assert.False(t, p.dead(), "and after KillOrphans")
}
