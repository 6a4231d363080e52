package proc

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func bash(script string) []string { return []string{"/bin/bash", "-c", script} }

func TestExitCodes(t *testing.T) {
	for _, code := range []int{0, 1, 3, 137, 255} {
		res, err := Run(context.Background(), Cmd{Argv: bash("exit " + strconv.Itoa(code)), Grace: time.Second})
		require.NoError(t, err)
		assert.Equal(t, code, res.ExitCode)
		assert.False(t, res.Signaled)
	}
	res, err := Run(context.Background(), Cmd{Argv: bash("kill -KILL $$"), Grace: time.Second})
	require.NoError(t, err)
	assert.True(t, res.Signaled)
	assert.Equal(t, 137, res.ExitCode)
}

func TestStartErrors(t *testing.T) {
	_, err := Run(context.Background(), Cmd{Argv: []string{"/nonexistent/prog"}})
	var se *StartError
	require.ErrorAs(t, err, &se)
	_, err = Run(context.Background(), Cmd{Argv: []string{"/bin/true"}, Dir: "/nonexistent/dir"})
	require.ErrorAs(t, err, &se)
	assert.Contains(t, err.Error(), "working directory /nonexistent/dir")
	_, err = Run(context.Background(), Cmd{})
	require.ErrorAs(t, err, &se)
}

func TestEnvIsExactAndStdinIsClosed(t *testing.T) {
	var out bytes.Buffer
	res, err := Run(context.Background(), Cmd{
		Argv:   []string{"/usr/bin/env"},
		Env:    []string{"ONLY=this"},
		Stdout: &out,
	})
	require.NoError(t, err)
	assert.Equal(t, 0, res.ExitCode)
	assert.Equal(t, "ONLY=this\n", out.String())

	out.Reset()
	_, err = Run(context.Background(), Cmd{Argv: bash("cat; echo end"), Stdout: &out})
	require.NoError(t, err)
	assert.Equal(t, "end\n", out.String(), "stdin is /dev/null, never a terminal or the runner's")
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	return len(f) > 0 && f[0] != "Z"
}

func readPid(t *testing.T, path string) int {
	t.Helper()
	var pid int
	require.Eventually(t, func() bool {
		b, err := os.ReadFile(path)
		if err != nil {
			return false
		}
		pid, err = strconv.Atoi(strings.TrimSpace(string(b)))
		return err == nil
	}, 10*time.Second, 10*time.Millisecond)
	return pid
}

func TestCancelSendsTermToGroup(t *testing.T) {
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "child")
	ctx, cancel := context.WithCancel(context.Background())
	var out bytes.Buffer
	go func() {
		readPid(t, pidFile)
		cancel()
	}()
	// The child's own TERM trap must run: graceful stop, not SIGKILL.
	res, err := Run(ctx, Cmd{
		Argv:   bash(`trap 'echo got TERM; exit 143' TERM; sleep 300 & echo $! > ` + pidFile + `; wait`),
		Stdout: &out, Grace: 10 * time.Second,
	})
	require.NoError(t, err)
	assert.True(t, res.Stopped)
	assert.False(t, res.Killed)
	assert.Equal(t, 143, res.ExitCode)
	assert.Contains(t, out.String(), "got TERM")
	assert.False(t, alive(readPid(t, pidFile)), "the background sleep in the group got TERM too")
}

func TestIgnoredTermIsKilledAfterGrace(t *testing.T) {
	dir := t.TempDir()
	ready := filepath.Join(dir, "ready")
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		readPid(t, ready)
		cancel()
	}()
	res, err := Run(ctx, Cmd{Argv: bash(`trap '' TERM; echo $$ > ` + ready + `; while :; do sleep 0.05; done`), Grace: 300 * time.Millisecond})
	require.NoError(t, err)
	assert.True(t, res.Stopped)
	assert.True(t, res.Killed)
	assert.True(t, res.Signaled)
	assert.Equal(t, syscall.SIGKILL, res.Signal)
}

func TestLeftoversInGroupAreKilled(t *testing.T) {
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "bg")
	var out bytes.Buffer
	// The background process keeps our stdout pipe open: Run must still
	// return when the main process exits.
	res, err := Run(context.Background(), Cmd{Argv: bash(`sleep 300 & echo $! > ` + pidFile + `; echo done`), Stdout: &out, Stderr: &out})
	require.NoError(t, err)
	assert.Equal(t, 0, res.ExitCode)
	assert.Equal(t, "done\n", out.String())
	pid := readPid(t, pidFile)
	assert.Eventually(t, func() bool { return !alive(pid) }, 5*time.Second, 20*time.Millisecond)
}

func TestKillOrphansEndsEscapedProcesses(t *testing.T) {
	require.NoError(t, BecomeSubreaper())
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "escaped")
	// setsid puts the sleeper in a new session and group: the group kill
	// misses it, but as subreaper we inherit it and KillOrphans ends it.
	_, err := Run(context.Background(), Cmd{Argv: bash(`setsid sleep 300 < /dev/null > /dev/null 2>&1 & echo $! > ` + pidFile), Grace: time.Second})
	require.NoError(t, err)
	pid := readPid(t, pidFile)
	require.Eventually(t, func() bool { return len(children(os.Getpid())) > 0 || !alive(pid) }, 5*time.Second, 10*time.Millisecond)
	KillOrphans()
	assert.False(t, alive(pid))
}
