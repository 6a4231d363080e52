package testenv

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The Slurm controller of scripts/test-env.sh, stopped and started for
// real by the fault tests. Other engineers' tests share the cluster, so:
// a test that stops it holds a machine-wide lock until it is up again
// (such tests never overlap, in any process), the controller is started
// again at the test's cleanup whatever happened, and a detached guard
// starts it if the test process dies first (a go test timeout skips
// cleanups).

const (
	slurmctldPidFile = "/run/slurm/slurmctld.pid"
	slurmctldLock    = "/run/ci-exec-test-slurmctld.lock"
	slurmctldBin     = "/usr/sbin/slurmctld"
)

// Slurmctld controls the test cluster's controller for one test.
type Slurmctld struct {
	t    testing.TB
	lock *os.File
}

// TakeSlurmctld takes the machine-wide lock for stopping the controller,
// and registers its restart at cleanup. Root only.
func TakeSlurmctld(t testing.TB) *Slurmctld {
	t.Helper()
	RequireRoot(t)
	RequireBinary(t, "scontrol")
	if _, err := os.Stat(slurmctldBin); err != nil {
		Missing(t, "no %s: %v", slurmctldBin, err)
	}
	f, err := os.OpenFile(slurmctldLock, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatalf("open %s: %v", slurmctldLock, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatalf("lock %s: %v", slurmctldLock, err)
	}
	c := &Slurmctld{t: t, lock: f}
	// The guard: started now, it waits for this process to end and then
	// starts the controller if it is not running.
	guard := exec.Command("/bin/sh", "-c", `while kill -0 "$1" 2>/dev/null; do sleep 1; done
pgrep -x slurmctld >/dev/null || exec "$2"`, "sh", strconv.Itoa(os.Getpid()), slurmctldBin)
	guard.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := guard.Start(); err != nil {
		t.Fatalf("start the slurmctld guard: %v", err)
	}
	_ = guard.Process.Release()
	t.Cleanup(func() {
		c.Start()
		_ = f.Close()
	})
	return c
}

func (c *Slurmctld) pid() int {
	b, err := os.ReadFile(slurmctldPidFile)
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	if pid <= 0 || syscall.Kill(pid, 0) != nil {
		return 0
	}
	return pid
}

// Stop stops the controller and waits until it has exited.
func (c *Slurmctld) Stop() {
	c.t.Helper()
	pid := c.pid()
	if pid == 0 {
		c.t.Fatalf("slurmctld is not running (no live pid in %s)", slurmctldPidFile)
	}
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		c.t.Fatalf("stop slurmctld: %v", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for syscall.Kill(pid, 0) == nil {
		if time.Now().After(deadline) {
			c.t.Fatalf("slurmctld (pid %d) did not exit within 30 s of SIGTERM", pid)
		}
		time.Sleep(50 * time.Millisecond)
	}
	c.t.Logf("slurmctld (pid %d) stopped", pid)
}

// Start starts the controller if it is not running and waits until it
// answers.
func (c *Slurmctld) Start() {
	c.t.Helper()
	if c.pid() == 0 {
		cmd := exec.Command(slurmctldBin)
		cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, nil, nil
		if out, err := cmd.CombinedOutput(); err != nil {
			c.t.Errorf("start slurmctld: %v: %s", err, out)
			return
		}
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		out, err := exec.Command("scontrol", "ping").CombinedOutput()
		if err == nil && bytes.Contains(out, []byte("is UP")) {
			// And the node has registered again (its state is "unknown"
			// until slurmd answers the new controller).
			st, _ := exec.Command("sinfo", "-h", "-o", "%T").Output()
			if bytes.Contains(st, []byte("idle")) || bytes.Contains(st, []byte("mix")) || bytes.Contains(st, []byte("alloc")) {
				c.t.Logf("slurmctld is up, node %s", bytes.TrimSpace(st))
				return
			}
			out = append(out, st...)
		}
		if time.Now().After(deadline) {
			c.t.Errorf("slurmctld does not answer 60 s after its start: %s", fmt.Sprint(string(out)))
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}
