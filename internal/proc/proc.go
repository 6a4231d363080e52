// Package proc runs one argv in its own process group and stops it the way
// the runner expects a stage to stop: SIGTERM to the whole group when the
// context ends, SIGKILL after a grace period, and nothing left behind once
// the stage returns.
//
// Commands are always executed directly (execve), never through `sh -c`, so
// no user-supplied string is ever parsed by a shell.
package proc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Cmd is what to run.
type Cmd struct {
	Argv []string
	// Env is the complete environment (nothing is inherited).
	Env []string
	Dir string
	// Stdin nil means /dev/null: a stage must never wait for input.
	Stdin  io.Reader
	Stdout io.Writer
	Stderr io.Writer
	// Grace is the time between SIGTERM and SIGKILL once ctx ends.
	Grace time.Duration
	// ExtraFiles become descriptors 3, 4, ... of the command.
	ExtraFiles []*os.File
}

// Result is how the command ended.
type Result struct {
	// ExitCode is the exit status, or 128+signal when killed by a signal
	// (what a shell would report).
	ExitCode int
	Signaled bool
	Signal   syscall.Signal
	// Stopped is true when ctx ended and the group was signalled.
	Stopped bool
	// Killed is true when SIGKILL was needed after the grace period.
	Killed bool
}

// StartError means the command could not be started at all (missing binary,
// bad working directory): an infrastructure fault, not the script's.
type StartError struct {
	Argv0 string
	Err   error
}

func (e *StartError) Error() string { return fmt.Sprintf("start %s: %v", e.Argv0, e.Err) }
func (e *StartError) Unwrap() error { return e.Err }

// Run starts c and waits for it. Once ctx ends, the process group gets
// SIGTERM, then SIGKILL after c.Grace. When the command exits, whatever it
// left running in its group is killed, so no process outlives the call.
func Run(ctx context.Context, c Cmd) (Result, error) {
	if len(c.Argv) == 0 {
		return Result{}, &StartError{Err: errors.New("empty command")}
	}
	if c.Dir != "" {
		// exec reports a missing working directory as a missing program.
		if fi, err := os.Stat(c.Dir); err != nil || !fi.IsDir() {
			return Result{}, &StartError{Argv0: c.Argv[0], Err: fmt.Errorf("working directory %s is not usable: %v", c.Dir, err)}
		}
	}
	cmd := exec.Command(c.Argv[0], c.Argv[1:]...)
	cmd.Env = c.Env
	if cmd.Env == nil {
		cmd.Env = []string{}
	}
	cmd.Dir = c.Dir
	cmd.Stdin = c.Stdin
	cmd.ExtraFiles = c.ExtraFiles
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setpgid: true,
		// If ci-exec itself is SIGKILLed (the runner's last resort), the
		// direct child dies with it instead of running on unsupervised.
		Pdeathsig: syscall.SIGKILL,
	}

	// Writers that are not files are fed through our own pipes so that Wait
	// returns when the process exits, even if a background grandchild still
	// holds the pipe open; the group is then killed, closing it.
	var copiers sync.WaitGroup
	var toClose []*os.File
	attach := func(w io.Writer, set func(io.Writer)) error {
		if w == nil {
			return nil
		}
		if f, ok := w.(*os.File); ok {
			set(f)
			return nil
		}
		r, pw, err := os.Pipe()
		if err != nil {
			return err
		}
		set(pw)
		toClose = append(toClose, pw)
		copiers.Add(1)
		go func() {
			defer copiers.Done()
			_, _ = io.Copy(w, r)
			r.Close()
		}()
		return nil
	}
	if err := attach(c.Stdout, func(w io.Writer) { cmd.Stdout = w }); err != nil {
		return Result{}, &StartError{Argv0: c.Argv[0], Err: err}
	}
	if c.Stderr == c.Stdout && cmd.Stdout != nil {
		cmd.Stderr = cmd.Stdout
	} else if err := attach(c.Stderr, func(w io.Writer) { cmd.Stderr = w }); err != nil {
		return Result{}, &StartError{Argv0: c.Argv[0], Err: err}
	}

	err := cmd.Start()
	for _, f := range toClose {
		f.Close()
	}
	if err != nil {
		copiers.Wait()
		return Result{}, &StartError{Argv0: c.Argv[0], Err: err}
	}
	pgid := cmd.Process.Pid

	var res Result
	done := make(chan struct{})
	var stopMu sync.Mutex
	go func() {
		select {
		case <-done:
			return
		case <-ctx.Done():
		}
		stopMu.Lock()
		res.Stopped = true
		stopMu.Unlock()
		// SIGCONT first: a stopped group would never act on SIGTERM.
		_ = syscall.Kill(-pgid, syscall.SIGCONT)
		_ = syscall.Kill(-pgid, syscall.SIGTERM)
		t := time.NewTimer(c.Grace)
		defer t.Stop()
		select {
		case <-done:
		case <-t.C:
			stopMu.Lock()
			res.Killed = true
			stopMu.Unlock()
			_ = syscall.Kill(-pgid, syscall.SIGKILL)
		}
	}()

	waitErr := cmd.Wait()
	close(done)
	// Leftovers in the group (background jobs, daemons that did not setsid).
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	copiers.Wait()

	stopMu.Lock()
	defer stopMu.Unlock()
	st, _ := cmd.ProcessState.Sys().(syscall.WaitStatus)
	switch {
	case st.Signaled():
		res.Signaled = true
		res.Signal = st.Signal()
		res.ExitCode = 128 + int(st.Signal())
	default:
		res.ExitCode = cmd.ProcessState.ExitCode()
	}
	var exitErr *exec.ExitError
	if waitErr != nil && !errors.As(waitErr, &exitErr) {
		return res, fmt.Errorf("wait for %s: %w", c.Argv[0], waitErr)
	}
	return res, nil
}

// BecomeSubreaper makes orphaned descendants (processes that left their
// group with setsid) reparent to this process instead of init, so that
// KillOrphans can find and end them when the stage is over.
func BecomeSubreaper() error {
	return unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
}

// KillOrphans SIGKILLs every remaining child of this process and reaps it.
// Call it after the stage's command has returned.
func KillOrphans() {
	self := os.Getpid()
	for range 3 {
		kids := children(self)
		if len(kids) == 0 {
			return
		}
		for _, pid := range kids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		for _, pid := range kids {
			var ws syscall.WaitStatus
			_, _ = syscall.Wait4(pid, &ws, 0, nil)
		}
	}
}

// children lists the pids whose parent is ppid, from /proc.
func children(ppid int) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// The command name may contain spaces and parentheses: parse after
		// the last ')'. Fields then: state ppid ...
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) < 2 {
			continue
		}
		if p, err := strconv.Atoi(f[1]); err == nil && p == ppid {
			out = append(out, pid)
		}
	}
	return out
}
