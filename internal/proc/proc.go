// Package proc runs one argv in its own process group and stops it the way
// the runner expects a stage to stop: SIGTERM to the whole group when the
// context ends, SIGKILL after a grace period, and nothing left behind once
// the stage returns — also what escaped the group (setsid, double fork, a
// daemon holding the output pipe), found through /proc when the process is
// a child subreaper (BecomeSubreaper).
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
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
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
	// Grace is the time between SIGTERM and SIGKILL once ctx ends. What
	// the command leaves running when it exits by itself gets
	// min(Grace, LeftoverGrace).
	Grace time.Duration
	// ExtraFiles become descriptors 3, 4, ... of the command.
	ExtraFiles []*os.File
	// Credential, when set, is the uid, gid and groups the command runs
	// as (a downscoping runner's stage; needs root or CAP_SETUID/SETGID).
	Credential *syscall.Credential
	// Keep, when set, is called once the command has exited and before
	// what it left running is ended: the PIDs it returns (processes the
	// command started on purpose to outlive it, such as a job's services)
	// and their descendants are not leftovers (see Keep).
	Keep func() []int
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
	// LeftBehind has the command name of each process the command left
	// running when it ended (in pid order), all of which were ended before
	// Run returned; see Summary for the job-log line.
	LeftBehind []string
	// Survivors are leftovers that could not be ended (not this user's to
	// signal, or stuck in the kernel).
	Survivors []string
}

// StartError means the command could not be started at all (missing binary,
// bad working directory): an infrastructure fault, not the script's.
type StartError struct {
	Argv0 string
	Err   error
}

func (e *StartError) Error() string { return fmt.Sprintf("start %s: %v", e.Argv0, e.Err) }
func (e *StartError) Unwrap() error { return e.Err }

// testHookStarted, when set, runs in Run's goroutine between the start of
// the command and the wait for it.
var testHookStarted func(pid int)

// Run starts c and waits for it. Once ctx ends, the process group and
// everything else the command started get SIGTERM, then SIGKILL after
// c.Grace. When the command exits, whatever it left running is ended too
// (SIGTERM, SIGKILL after min(c.Grace, LeftoverGrace)) and Run returns
// without waiting for the output pipes to be closed by such leftovers: no
// process of the command outlives the call.
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
	// Only a Stdin that is not a file has a copying goroutine in os/exec;
	// it must not hold Wait either.
	cmd.WaitDelay = drainIdle
	cmd.ExtraFiles = c.ExtraFiles
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setpgid: true,
		// If ci-exec itself is SIGKILLed (the runner's last resort), the
		// direct child dies with it instead of running on unsupervised.
		Pdeathsig: syscall.SIGKILL,
		// The kernel applies Pdeathsig after the credential change (Go sets
		// it after setuid), so a downscoped child keeps it.
		Credential: c.Credential,
	}

	// Writers that are not files are fed through our own pipes so that Wait
	// returns when the process exits, even if a leftover still holds the
	// pipe open; the leftovers are then ended, and the pipe drained.
	var pipes []*outPipe
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
		p := &outPipe{r: r, w: w, done: make(chan struct{})}
		pipes = append(pipes, p)
		go p.copy()
		return nil
	}
	drain := func() {
		for _, p := range pipes {
			p.drain()
		}
	}
	closeWriteEnds := func() {
		for _, f := range toClose {
			f.Close()
		}
	}
	if err := attach(c.Stdout, func(w io.Writer) { cmd.Stdout = w }); err != nil {
		closeWriteEnds()
		drain()
		return Result{}, &StartError{Argv0: c.Argv[0], Err: err}
	}
	if c.Stderr == c.Stdout && cmd.Stdout != nil {
		cmd.Stderr = cmd.Stdout
	} else if err := attach(c.Stderr, func(w io.Writer) { cmd.Stderr = w }); err != nil {
		closeWriteEnds()
		drain()
		return Result{}, &StartError{Argv0: c.Argv[0], Err: err}
	}

	// Pdeathsig fires when the *thread* that forked the child exits, not
	// the process (golang/go#27505): the Go runtime ends a thread whenever
	// a goroutine locked to it returns, and an idle thread can be handed
	// to such a goroutine. Holding this goroutine on its thread from the
	// fork to the end of the wait keeps that thread alive exactly as long
	// as the child may need it.
	runtime.LockOSThread()
	reg.Lock()
	err := cmd.Start()
	if err == nil {
		reg.mains[cmd.Process.Pid] = true
	}
	reg.Unlock()
	closeWriteEnds()
	if err != nil {
		runtime.UnlockOSThread()
		drain()
		return Result{}, &StartError{Argv0: c.Argv[0], Err: err}
	}
	pid := cmd.Process.Pid

	var res Result
	var stopMu sync.Mutex
	var stopAt time.Time
	done := make(chan struct{})
	stopDone := make(chan struct{})
	go func() {
		defer close(stopDone)
		select {
		case <-done:
			return
		case <-ctx.Done():
		}
		stopMu.Lock()
		res.Stopped = true
		stopAt = time.Now()
		stopMu.Unlock()
		signalAll(pid, syscall.SIGTERM)
		t := time.NewTimer(c.Grace)
		defer t.Stop()
		select {
		case <-done:
		case <-t.C:
			stopMu.Lock()
			res.Killed = true
			stopMu.Unlock()
			signalAll(pid, syscall.SIGKILL)
		}
	}()

	if testHookStarted != nil {
		testHookStarted(pid)
	}
	waitErr := cmd.Wait()
	runtime.UnlockOSThread()
	reg.Lock()
	delete(reg.mains, pid)
	reg.Unlock()
	close(done)
	<-stopDone

	if c.Keep != nil {
		for _, p := range c.Keep() {
			Keep(p)
		}
	}
	stopMu.Lock()
	killAt := time.Now().Add(min(c.Grace, LeftoverGrace))
	if res.Stopped {
		killAt = stopAt.Add(c.Grace)
	}
	stopMu.Unlock()
	left := endLeftovers(pid, killAt)
	res.LeftBehind, res.Survivors = left.names, left.survivors
	drain()

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
	if waitErr != nil && !errors.As(waitErr, &exitErr) && !errors.Is(waitErr, exec.ErrWaitDelay) {
		return res, fmt.Errorf("wait for %s: %w", c.Argv[0], waitErr)
	}
	return res, nil
}

// outPipe copies one of the command's outputs to its writer.
type outPipe struct {
	r        *os.File
	w        io.Writer
	done     chan struct{}
	draining atomic.Bool
}

func (p *outPipe) copy() {
	defer close(p.done)
	defer p.r.Close()
	buf := make([]byte, 32<<10)
	for {
		if p.draining.Load() {
			_ = p.r.SetReadDeadline(time.Now().Add(drainIdle))
		}
		n, err := p.r.Read(buf)
		if n > 0 {
			if _, werr := p.w.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// drain waits until the pipe is at its end, or has been idle for
// drainIdle: once nothing of the command is left, whatever still holds
// the pipe is not ours to wait for. Output that keeps coming is read.
func (p *outPipe) drain() {
	p.draining.Store(true)
	_ = p.r.SetReadDeadline(time.Now().Add(drainIdle))
	<-p.done
}
