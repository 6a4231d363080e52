package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestExecEventsNamePID checks the connector path: every exec reported
// with the PID whose argv is then readable.
func TestExecEventsNamePID(t *testing.T) {
	RequireRoot(t)
	pids := make(chan int, 1024)
	l, err := listenExecs(func(pid int) {
		select {
		case pids <- pid:
		default:
		}
	})
	if err != nil {
		t.Fatalf("root but no process events connector: %v", err)
	}
	defer l.close()

	// cat blocks on its stdin until the test closes it: the event for its
	// PID must come while it is still alive.
	needle := fmt.Sprintf("ci-exec-exec-event-%d", os.Getpid())
	cmd := exec.Command("/bin/cat", "/dev/stdin", "-", needle)
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		in.Close()
		_ = cmd.Wait()
	}()
	deadline := time.After(30 * time.Second) // a guard against a hang, not a synchronisation
	for {
		select {
		case pid := <-pids:
			if pid == cmd.Process.Pid {
				if got := cmdline(itoa(pid)); !strings.Contains(got, needle) {
					t.Fatalf("exec event for pid %d, but its argv is %q", pid, got)
				}
				return
			}
		case <-deadline:
			t.Fatalf("no exec event for pid %d", cmd.Process.Pid)
		}
	}
}

func TestWatchCmdlinesReportsNeedles(t *testing.T) {
	needle := fmt.Sprintf("ci-exec-watch-needle-%d", os.Getpid())
	stop := WatchCmdlines(needle)
	cmd := exec.Command("/bin/cat", "-", needle)
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// The process is alive until stop returns: stop's final look must find it.
	hits := stop()
	in.Close()
	_ = cmd.Wait()
	if len(hits) != 1 || !strings.Contains(hits[0], needle) {
		t.Fatalf("hits = %q", hits)
	}
	if hits := WatchCmdlines("no-such-needle-anywhere-" + needle)(); len(hits) != 0 {
		t.Fatalf("hits without the needle: %q", hits)
	}
}
