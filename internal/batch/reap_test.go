package batch

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/testenv"
)

func TestBatchScriptWithReaperGolden(t *testing.T) {
	got := BatchScript([]string{"/usr/bin/env", "it's"}, "0123abcd", "ci-7-build_script", "/s/b.started", Reaper{Path: "/opt/ci exec/ci-exec", Grace: 10 * time.Second})
	want := `#!/bin/sh
# ci-exec batch script for ci-7-build_script
if [ -x '/opt/ci exec/ci-exec' ]; then
  set -- '/opt/ci exec/ci-exec' reap --grace=10s --
else
  printf 'WARNING: ci-exec is not at %s on %s: processes the stage leaves running there are not stopped when it ends (install ci-exec at the same path on every compute node: docs/slurm.md)\n' '/opt/ci exec/ci-exec' "${SLURMD_NODENAME:-this node}" >&2
  set --
fi
"$@" '/usr/bin/env' \
  'it'\''s' </dev/null 3>'/s/b.started'
rc=$?
started=0
[ -s '/s/b.started' ] && started=1
printf '\n__CI_EXEC_BATCH_END__ 0123abcd rc=%d started=%d\n' "$rc" "$started"
exit "$rc"
`
	assert.Equal(t, want, got)
}

// runReaped runs the batch script for argv with reaper as a compute node
// would (sh, output to one file), and fails the test if the script waits
// for the process whose pid argv writes to pidFile: the test then kills
// that process itself and reports the hang.
func runReaped(t *testing.T, reaper Reaper, argv []string, pidFile string) (string, int) {
	t.Helper()
	dir := t.TempDir()
	script := filepath.Join(dir, "job.sh")
	require.NoError(t, os.WriteFile(script, []byte(BatchScript(argv, "f00d", "ci-1-test", filepath.Join(dir, "job.sh.started"), reaper)), 0o700))
	out, err := os.Create(filepath.Join(dir, "job.out"))
	require.NoError(t, err)
	defer out.Close()
	cmd := exec.Command("/bin/sh", script)
	cmd.Stdout, cmd.Stderr = out, out
	require.NoError(t, cmd.Start())
	ended := make(chan error, 1)
	go func() { ended <- cmd.Wait() }()
	select {
	case err = <-ended:
	case <-time.After(30 * time.Second):
		if b, err := os.ReadFile(pidFile); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		<-ended
		t.Fatalf("the batch script waited for the process its command left running")
	}
	rc := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		rc = ee.ExitCode()
	} else {
		require.NoError(t, err)
	}
	b, err := os.ReadFile(out.Name())
	require.NoError(t, err)
	return string(b), rc
}

func gone(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	return len(f) > 0 && f[0] == "Z"
}

// A command that leaves a process in a session of its own (which
// proctrack/linuxproc would lose) ends, with the process, when `ci-exec
// reap` wraps it; its exit code is the command's.
func TestReaperEndsWhatTheCommandLeaves(t *testing.T) {
	reaper := Reaper{Path: testenv.Driver(t), Grace: 5 * time.Second}
	pidFile := filepath.Join(t.TempDir(), "leftover")
	// The command waits until the leftover runs sleep (past setsid and exec).
	cmd := `setsid sleep 300 & echo $! > "$1"; until [ "$(cat /proc/$!/comm)" = sleep ]; do :; done; echo left; exit 3`
	out, rc := runReaped(t, reaper, []string{"/bin/bash", "-c", cmd, "bash", pidFile}, pidFile)
	assert.Equal(t, 3, rc)
	assert.Contains(t, out, "left\n")
	assert.Contains(t, out, "stopped 1 process the stage left running: sleep\n")
	assert.True(t, strings.HasSuffix(out, marker("f00d", 3)), out)
	b, err := os.ReadFile(pidFile)
	require.NoError(t, err)
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	require.NoError(t, err)
	assert.True(t, gone(pid), "the leftover %d is gone when the script ends", pid)

	out, rc = runReaped(t, reaper, []string{"/bin/sh", "-c", `kill -TERM $$`}, pidFile)
	assert.Equal(t, 143, rc, "a signal reads as 128+n, as sh reports it")
	assert.True(t, strings.HasSuffix(out, marker("f00d", 143)), out)
	assert.NotContains(t, out, "stopped")

	out, rc = runReaped(t, reaper, []string{"/nonexistent/runtime", "x"}, pidFile)
	assert.Equal(t, 127, rc, "a missing program reads as sh's 127")
	assert.Contains(t, out, "/nonexistent/runtime")
}

// A node without ci-exec at the login node's path runs the command bare,
// saying what that means.
func TestReaperMissingOnTheNode(t *testing.T) {
	pidFile := filepath.Join(t.TempDir(), "none")
	out, rc := runReaped(t, Reaper{Path: "/nonexistent/ci-exec", Grace: time.Second}, []string{"/bin/sh", "-c", "echo ran; exit 4"}, pidFile)
	assert.Equal(t, 4, rc)
	assert.Contains(t, out, "WARNING: ci-exec is not at /nonexistent/ci-exec on this node: processes the stage leaves running there are not stopped")
	assert.Contains(t, out, "ran\n")
	assert.True(t, strings.HasSuffix(out, marker("f00d", 4)), out)
}

func TestSelfReaper(t *testing.T) {
	r, err := SelfReaper(3 * time.Second)
	require.NoError(t, err)
	self, err := os.Executable()
	require.NoError(t, err)
	assert.Equal(t, Reaper{Path: self, Grace: 3 * time.Second}, r)
	assert.True(t, filepath.IsAbs(r.Path))
}
