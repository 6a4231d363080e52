package runnerdouble

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// buildError is the runner's common.BuildError: a job failure with a reason
// and exit code; it is never retried by prepare.
type buildError struct {
	inner    error
	reason   string
	exitCode int
}

func (e *buildError) Error() string {
	if e.inner == nil {
		return "error"
	}
	return e.inner.Error()
}

func (e *buildError) Unwrap() error { return e.inner }

// unknownFailureError is the custom executor's UnknownFailureError.
type unknownFailureError struct {
	inner    error
	exitCode int
}

func (e *unknownFailureError) Error() string {
	return fmt.Sprintf("unknown Custom executor executable exit code %d; executable execution terminated with: %v",
		e.exitCode, e.inner)
}

// killProcessError is the runner's process.KillProcessError.
type killProcessError struct{ pid int }

func (e *killProcessError) Error() string {
	return fmt.Sprintf("failed to kill process PID=%d, likely process is dormant", e.pid)
}

var (
	errJobCanceled      = errors.New("canceled")
	errJobScriptTimeout = errors.New("script timeout exceeded")
)

// callSpec describes one driver call.
type callSpec struct {
	kind, stage string
	args        []string
	env         []string
	scriptPath  string
	out         io.Writer // stdout and stderr (one pipe) unless stdout is set
	stdout      io.Writer
}

// dedupEnv keeps the last value of every key, in the position of its first
// occurrence, as os/exec does.
func dedupEnv(env []string) []string {
	last := map[string]string{}
	var order []string
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		if _, seen := last[k]; !seen {
			order = append(order, k)
		}
		last[k] = kv
	}
	out := make([]string, 0, len(order))
	for _, k := range order {
		out = append(out, last[k])
	}
	return out
}

// exec runs one driver call like the runner's command.Run: a new process in
// its own process group, stdin not connected, killed through the group when
// ctx ends. It records the call and returns the runner-classified error.
func (r *run) exec(ctx context.Context, cs callSpec) error {
	if !r.cfg.KeepBuildExitCodeFile {
		_ = os.Remove(r.exitCodeFile)
	}
	env := dedupEnv(cs.env)
	call := StageCall{
		Kind:       cs.kind,
		Stage:      cs.stage,
		Args:       append([]string(nil), cs.args...),
		Env:        env,
		Dir:        r.tmp,
		ScriptPath: cs.scriptPath,
		ExitCode:   -1,
		Start:      time.Now(),
	}
	defer func() {
		call.Duration = time.Since(call.Start)
		r.addCall(call)
	}()

	cmd := exec.Command(r.cfg.Driver, cs.args...)
	cmd.Dir = r.tmp
	cmd.Env = env
	cmd.Stdin = nil
	g := &gate{w: cs.out}
	cmd.Stderr = g
	if cs.stdout != nil {
		cmd.Stdout = &gate{w: cs.stdout}
	} else {
		cmd.Stdout = g
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Credential: r.cfg.Credential}

	if err := cmd.Start(); err != nil {
		call.StartError = err.Error()
		return fmt.Errorf("failed to start command: %w", err)
	}
	call.Pid = cmd.Process.Pid
	call.Pgid = cmd.Process.Pid
	rss := watchPeakRSS(call.Pid)

	waitCh := make(chan error, 1)
	go func() { waitCh <- cmd.Wait() }()

	var werr error
	select {
	case werr = <-waitCh:
	case <-ctx.Done():
		werr = r.killAndWait(&call, waitCh)
	}
	call.PeakRSS = rss.end()
	if call.GaveUp {
		g.closed.Store(true)
		if sg, ok := cmd.Stdout.(*gate); ok {
			sg.closed.Store(true)
		}
	}
	if !call.GaveUp && cmd.ProcessState != nil { // ProcessState is only safe to read after Wait returned
		call.ExitCode = cmd.ProcessState.ExitCode()
		if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			call.Signaled = true
		}

	}
	return r.classify(werr)
}

// killAndWait is the runner's osKillWait.KillAndWait: SIGTERM to the
// process group, SIGKILL after the graceful kill timeout, give up after the
// force kill timeout.
func (r *run) killAndWait(call *StageCall, waitCh chan error) error {
	pgid := call.Pid
	call.Terminated = true
	if err := syscall.Kill(-pgid, syscall.SIGTERM); err != nil {
		call.ForceKilled = true
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
	}
	select {
	case err := <-waitCh:
		return err
	case <-time.After(r.cfg.GracefulKillTimeout):
	}
	call.ForceKilled = true
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	select {
	case err := <-waitCh:
		return err
	case <-time.After(r.cfg.ForceKillTimeout):
		call.GaveUp = true
		return &killProcessError{pid: pgid}
	}
}

// classify is the custom executor's waitForCommand mapping of exit codes.
func (r *run) classify(err error) error {
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		return err
	}
	code := ee.ExitCode()
	switch {
	case code == 1:
		return r.parseBuildFailure(ee)
	case code != 2:
		return &unknownFailureError{inner: ee, exitCode: code}
	}
	return ee
}

// parseBuildFailure reads the first line of BUILD_EXIT_CODE_FILE.
func (r *run) parseBuildFailure(ee *exec.ExitError) error {
	f, err := os.Open(r.exitCodeFile)
	if err != nil {
		return &buildError{inner: ee, exitCode: 1, reason: ReasonScriptFailure}
	}
	defer f.Close()
	var codeStr string
	sc := bufio.NewScanner(f)
	if sc.Scan() {
		codeStr = sc.Text()
	}
	code, err := strconv.Atoi(codeStr)
	if err != nil {
		return &unknownFailureError{inner: ee, exitCode: 2}
	}
	return &buildError{inner: fmt.Errorf("exit status %s", codeStr), exitCode: code, reason: ReasonScriptFailure}
}
