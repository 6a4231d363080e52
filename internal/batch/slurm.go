package batch

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Slurm runs one stage's command as a Slurm batch job and follows it: the
// job's output is streamed into the stage's log while it runs, its state
// is polled with scontrol (no sacct: accounting is often absent), and
// cancelling the stage scancels the job.
type Slurm struct {
	// Bin is the directory of sbatch, scontrol and scancel ("" = a fixed
	// system PATH).
	Bin string
	// Poll is the state polling interval.
	Poll time.Duration
	// PendingLimit cancels a job pending longer (0 = no limit).
	PendingLimit time.Duration
	// UnknownLimit is how long the job may be unknown to Slurm before it is
	// given up as vanished.
	UnknownLimit time.Duration
	// Grace is how long a cancelled job gets to end (its TERM traps run)
	// before it is killed.
	Grace time.Duration
	// Env is the environment of scontrol and scancel.
	Env []string
	// Logf writes one job-log line.
	Logf func(format string, args ...any)
	// Reaper wraps the command in the batch script (see Reaper).
	Reaper Reaper
}

// Job is one submission.
type Job struct {
	Spec SubmitSpec
	// Argv is the command the batch job runs (the stage's container or
	// host command), with Env its complete environment: sbatch exports
	// its own environment to the job (--export=ALL).
	Argv []string
	Env  []string
	// Script is where the batch script is written.
	Script string
	// Out receives the job's output as it grows.
	Out io.Writer
}

// Result is how the Slurm job ended.
type Result struct {
	JobID string
	// State is Slurm's final JobState (COMPLETED, FAILED, CANCELLED,
	// TIMEOUT, NODE_FAIL, PREEMPTED, OUT_OF_MEMORY, ...), or "VANISHED".
	State string
	// ExitCode is the command's exit code (from the end marker when the
	// batch script got to write it, else from scontrol).
	ExitCode int
	// Marker is true when the batch script reported the command's end.
	Marker bool
	// Stopped is true when the job was cancelled because ctx ended.
	Stopped bool
	// PendingReason is Slurm's reason when the pending limit cancelled it.
	PendingReason string
}

// Errors of Run.
var (
	// ErrPendingLimit: the job pended longer than PendingLimit and was
	// cancelled (Result.PendingReason says why it waited).
	ErrPendingLimit = errors.New("pending limit reached")
	// ErrVanished: Slurm stopped knowing the job without a final state.
	ErrVanished = errors.New("the job vanished")
)

// SubmitError is sbatch refusing the job; User says whether the request
// itself was wrong (bad partition, impossible resources) rather than Slurm
// being unavailable.
type SubmitError struct {
	Msg  string
	User bool
}

func (e *SubmitError) Error() string { return e.Msg }

// markerPrefix starts the batch script's last line; a random nonce per
// submission follows, so a job's own output cannot fake the end.
const markerPrefix = "__CI_EXEC_BATCH_END__"

// BatchScript is the script sbatch runs: the command, quoted word by word
// (no word is ever interpreted by the shell) and wrapped by the reaper,
// then the end marker with its exit code. Slurm signals every process of
// the job on scancel, so the command's own TERM traps run; the script only
// reports.
func BatchScript(argv []string, nonce string, jobName string, reaper Reaper) string {
	var b strings.Builder
	b.WriteString("#!/bin/sh\n# ci-exec batch script for " + jobName + "\n")
	b.WriteString(reaper.prologue())
	b.WriteString(reaper.prefix())
	for i, a := range argv {
		if i > 0 {
			b.WriteString(" \\\n  ")
		}
		b.WriteString(shellQuote(a))
	}
	b.WriteString(" </dev/null\nrc=$?\n")
	fmt.Fprintf(&b, "printf '\\n%s %s rc=%%d\\n' \"$rc\"\nexit \"$rc\"\n", markerPrefix, nonce)
	return b.String()
}

// shellQuote single-quotes s for a POSIX shell.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

func (s *Slurm) program(name string) string {
	dirs := []string{"/usr/local/bin", "/usr/bin", "/bin"}
	if s.Bin != "" {
		dirs = []string{s.Bin}
	}
	for _, d := range dirs {
		p := filepath.Join(d, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() {
			return p
		}
	}
	return filepath.Join(dirs[0], name)
}

// Run submits j and follows it until it ends. When ctx ends, the job is
// scancelled (pending or running), given Grace to finish, then killed.
func (s *Slurm) Run(ctx context.Context, j Job) (Result, error) {
	var res Result
	nonceB := make([]byte, 12)
	_, _ = rand.Read(nonceB)
	nonce := hex.EncodeToString(nonceB)
	script := BatchScript(j.Argv, nonce, j.Spec.JobName, s.Reaper)
	if err := os.WriteFile(j.Script, []byte(script), 0o700); err != nil {
		return res, fmt.Errorf("write the batch script: %w", err)
	}
	_ = os.Remove(j.Spec.Output) // from an earlier attempt
	id, err := s.submit(j)
	if err != nil {
		return res, err
	}
	res.JobID = id
	s.Logf("Submitted Slurm job %s (%s); output is streamed below.", id, j.Spec.JobName)

	tail := &follower{path: j.Spec.Output, out: j.Out, marker: markerPrefix + " " + nonce + " rc="}
	w := watch{s: s, id: id, tail: tail, start: time.Now()}
	// The output file is read often (cheap, and the end marker makes the
	// end visible at once); Slurm is asked every Poll, and often again
	// once the marker has shown up, to see the job leave.
	fast := min(tailInterval, s.Poll)
	tick := time.NewTicker(fast)
	defer tick.Stop()
	var nextState time.Time
	for {
		tail.poll()
		if now := time.Now(); tail.done || !now.Before(nextState) {
			nextState = now.Add(s.Poll)
			if end, err := w.check(&res); end {
				return res, err
			}
		}
		select {
		case <-ctx.Done():
			return w.stop(res), nil
		case <-tick.C:
		}
	}
}

// tailInterval is how often the output file is read.
const tailInterval = 50 * time.Millisecond

// watch is the state of following one job.
type watch struct {
	s     *Slurm
	id    string
	tail  *follower
	start time.Time

	pendingSince, unknownSince time.Time
	pendingLogged              bool
}

// check asks Slurm about the job once; end is true when Run is over.
func (w *watch) check(res *Result) (end bool, err error) {
	s, id, tail := w.s, w.id, w.tail
	st, err := s.state(id)
	now := time.Now()
	switch {
	case err != nil:
		// Not known (any more), or scontrol failed: give it time.
		if w.unknownSince.IsZero() {
			w.unknownSince = now
		}
		if tail.done {
			res.State, res.ExitCode, res.Marker = "COMPLETED", tail.rc, true
			if tail.rc != 0 {
				res.State = "FAILED"
			}
			return true, nil
		}
		if now.Sub(w.unknownSince) > s.UnknownLimit {
			res.State = "VANISHED"
			return true, fmt.Errorf("%w: Slurm has not known job %s for %s (%v)", ErrVanished, id, s.UnknownLimit, err)
		}
	case isFinal(st.State):
		tail.drain(2 * time.Second)
		res.State = st.State
		res.ExitCode = st.ExitCode
		if tail.done {
			res.ExitCode, res.Marker = tail.rc, true
		}
		return true, nil
	default:
		w.unknownSince = time.Time{}
		if st.State != "PENDING" {
			w.pendingSince = time.Time{}
			return false, nil
		}
		if w.pendingSince.IsZero() {
			w.pendingSince = now
		}
		if !w.pendingLogged && now.Sub(w.start) > 5*time.Second {
			s.Logf("Slurm job %s is pending (reason: %s).", id, st.Reason)
			w.pendingLogged = true
		}
		if s.PendingLimit > 0 && now.Sub(w.pendingSince) > s.PendingLimit {
			res.PendingReason = st.Reason
			s.cancel(id, nil)
			s.waitGone(id, s.Grace+10*time.Second)
			res.State = "CANCELLED"
			return true, ErrPendingLimit
		}
	}
	return false, nil
}

// stop scancels the job (pending or running: Slurm sends SIGTERM to all
// its processes, so the job's traps run), waits Grace for it to end, then
// kills it, and reports what it wrote.
func (w *watch) stop(res Result) Result {
	s, id := w.s, w.id
	res.Stopped = true
	s.Logf("Cancelling Slurm job %s (scancel).", id)
	s.cancel(id, nil)
	final := s.waitGone(id, s.Grace)
	if final == "" {
		s.Logf("Slurm job %s did not end within %s: sending SIGKILL.", id, s.Grace)
		s.cancel(id, []string{"--signal=KILL", "--full"})
		final = s.waitGone(id, 10*time.Second)
	}
	w.tail.drain(time.Second)
	res.State = final
	if w.tail.done {
		res.ExitCode, res.Marker = w.tail.rc, true
	}
	return res
}

// submit runs sbatch --parsable with the batch script as its argument.
func (s *Slurm) submit(j Job) (string, error) {
	args := append(SbatchArgs(j.Spec), j.Script)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, s.program("sbatch"), args...)
	cmd.Env = j.Env
	cmd.Dir = j.Spec.Chdir
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	msg := strings.TrimSpace(stderr.String())
	if err != nil {
		if msg == "" {
			msg = err.Error()
		}
		return "", classifySubmit(msg)
	}
	id, _, _ := strings.Cut(strings.TrimSpace(stdout.String()), ";")
	if !jobIDRE.MatchString(id) {
		return "", &SubmitError{Msg: fmt.Sprintf("sbatch printed no job id: %q %s", stdout.String(), msg)}
	}
	return id, nil
}

var jobIDRE = regexp.MustCompile(`^[0-9]+$`)

// classifySubmit tells a request Slurm refuses (the user's to fix) from
// Slurm being unavailable.
func classifySubmit(msg string) error {
	msg = strings.TrimSpace(msg)
	last := msg
	if i := strings.LastIndex(msg, "\n"); i >= 0 {
		last = strings.TrimSpace(msg[i+1:])
	}
	unavailable := []string{"Unable to contact slurm controller", "Socket timed out", "Connection refused",
		"Slurm backup controller in standby mode", "Zero Bytes were transmitted", "Communication connection failure",
		"Unable to allocate resources: Slurm temporarily unable", "executable file not found", "no such file or directory"}
	for _, u := range unavailable {
		if strings.Contains(last, u) {
			return &SubmitError{Msg: last}
		}
	}
	return &SubmitError{Msg: last, User: true}
}

// jobState is what scontrol reports about a job.
type jobState struct {
	State    string
	Reason   string
	ExitCode int
	Signal   int
}

var (
	stateRE    = regexp.MustCompile(`\bJobState=(\S+)`)
	reasonRE   = regexp.MustCompile(`\bReason=(\S+)`)
	exitCodeRE = regexp.MustCompile(`\bExitCode=([0-9]+):([0-9]+)`)
)

// ParseJob reads one line of `scontrol show job -o`.
func ParseJob(line string) (jobState, error) {
	m := stateRE.FindStringSubmatch(line)
	if m == nil {
		return jobState{}, fmt.Errorf("no JobState in %q", strings.TrimSpace(line))
	}
	st := jobState{State: m[1]}
	if r := reasonRE.FindStringSubmatch(line); r != nil {
		st.Reason = r[1]
	}
	if e := exitCodeRE.FindStringSubmatch(line); e != nil {
		st.ExitCode, _ = strconv.Atoi(e[1])
		st.Signal, _ = strconv.Atoi(e[2])
	}
	return st, nil
}

func (s *Slurm) state(id string) (jobState, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, s.program("scontrol"), "show", "job", "-o", id)
	cmd.Env = s.Env
	out, err := cmd.CombinedOutput()
	if err != nil {
		return jobState{}, fmt.Errorf("scontrol show job %s: %v: %s", id, err, strings.TrimSpace(string(out)))
	}
	return ParseJob(string(out))
}

// isFinal reports whether a JobState is an end state. Transitional
// states (COMPLETING, a CANCELLED job's processes still ending, ...) are
// not.
func isFinal(state string) bool {
	switch state {
	case "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE":
		return true
	}
	return false
}

func (s *Slurm) cancel(id string, extra []string) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, s.program("scancel"), append(extra, id)...)
	cmd.Env = s.Env
	if out, err := cmd.CombinedOutput(); err != nil {
		s.Logf("scancel %s: %v: %s", id, err, strings.TrimSpace(string(out)))
	}
}

// waitGone waits until the job is in a final state (and no longer
// COMPLETING) and returns that state, or "" after limit.
func (s *Slurm) waitGone(id string, limit time.Duration) string {
	deadline := time.Now().Add(limit)
	for {
		st, err := s.state(id)
		if err != nil {
			return "GONE"
		}
		if isFinal(st.State) && !strings.Contains(st.State, "COMPLETING") {
			return st.State
		}
		if time.Now().After(deadline) {
			return ""
		}
		time.Sleep(s.Poll)
	}
}

// follower copies a growing output file to out, line by line, holding
// back the end marker. The file may appear late (the job has not started,
// or the compute node's write is not visible yet) and grow slowly.
type follower struct {
	path   string
	out    io.Writer
	marker string
	off    int64
	part   []byte
	done   bool
	rc     int
	// blank is an empty line held back: the marker is printed after a
	// newline of its own, which is not the job's output.
	blank bool
}

// poll copies what was added since the last call.
func (f *follower) poll() {
	fh, err := os.Open(f.path)
	if err != nil {
		return
	}
	defer fh.Close()
	if _, err := fh.Seek(f.off, io.SeekStart); err != nil {
		return
	}
	r := bufio.NewReader(fh)
	for {
		line, err := r.ReadBytes('\n')
		f.off += int64(len(line))
		if len(line) > 0 {
			f.part = append(f.part, line...)
			if line[len(line)-1] == '\n' {
				f.emit(f.part)
				f.part = f.part[:0]
			}
		}
		if err != nil {
			return
		}
	}
}

func (f *follower) emit(line []byte) {
	text := strings.TrimRight(string(line), "\n")
	if rest, ok := strings.CutPrefix(text, f.marker); ok {
		if rc, err := strconv.Atoi(rest); err == nil {
			f.done, f.rc, f.blank = true, rc, false
			return
		}
	}
	if f.done {
		return
	}
	if f.blank {
		_, _ = f.out.Write([]byte("\n"))
		f.blank = false
	}
	if text == "" {
		f.blank = true
		return
	}
	_, _ = f.out.Write(line)
}

// drain keeps reading until the end marker shows up or limit passes (the
// node's last writes may reach shared storage late), then flushes a final
// partial line.
func (f *follower) drain(limit time.Duration) {
	deadline := time.Now().Add(limit)
	for {
		f.poll()
		if f.done || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if f.done {
		return
	}
	if f.blank {
		_, _ = f.out.Write([]byte("\n"))
		f.blank = false
	}
	if len(f.part) > 0 {
		_, _ = f.out.Write(append(f.part, '\n'))
		f.part = nil
	}
}
