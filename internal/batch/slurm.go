package batch

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ci-exec/ci-exec/internal/proc"
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
	// Env is the environment of scontrol and scancel. Its SLURM_CONF, if
	// any, is also sbatch's: all three must talk to the same controller,
	// or ci-exec would submit a job it cannot see.
	Env []string
	// User is the job user's name: a submission cut short is cleaned up by
	// cancelling that user's jobs of the job's name (see Run).
	User string
	// Logf writes one job-log line.
	Logf func(format string, args ...any)
	// Reaper wraps the command in the batch script (see Reaper).
	Reaper Reaper
	// SubmitAttempts is how often sbatch is tried while it cannot reach
	// the controller (0 or 1: once). A run stage has no retry of its own
	// (the runner retries prepare, not run), and a controller restart or
	// failover takes seconds.
	SubmitAttempts int

	// killWait is how long a killed job gets to leave (0: 10 s).
	killWait time.Duration
	// retryDelay is the wait between submission attempts (0: 5 s).
	retryDelay time.Duration
	// pendingFirst and pendingEvery time the pending lines (0: 5 s and
	// pendingLogEvery; see watch.logPending).
	pendingFirst, pendingEvery time.Duration
}

// Job is one submission.
type Job struct {
	Spec SubmitSpec
	// Argv is the command the batch job runs (the stage's container or
	// host command), with Env its complete environment: sbatch exports
	// its own environment to the job (--export=ALL). Env's Slurm variables
	// are dropped (see submitEnv).
	Argv []string
	Env  []string
	// Script is where the batch script is written; the start file (see
	// BatchScript) is Script + ".started".
	Script string
	// Out receives the job's output as it grows.
	Out io.Writer
}

// Result is how the Slurm job ended.
type Result struct {
	JobID string
	// State is Slurm's final JobState (COMPLETED, FAILED, CANCELLED,
	// TIMEOUT, NODE_FAIL, PREEMPTED, OUT_OF_MEMORY, ...), "VANISHED", or
	// "GONE" (stopped, and Slurm no longer knew the job when asked).
	State string
	// ExitCode is the command's exit code (from the end marker when the
	// batch script got to write it, else from scontrol), and Signal the
	// signal scontrol reports (ExitCode=N:S) when there is no marker.
	ExitCode int
	Signal   int
	// Marker is true when the batch script reported the command's end.
	Marker bool
	// Started is true when the marker says the command wrote to its file
	// descriptor 3 (see BatchScript): the stage's script began.
	Started bool
	// Stopped is true when the job was cancelled because ctx ended.
	Stopped bool
	// Killed is true when the cancelled job did not end within Grace and
	// was sent SIGKILL.
	Killed bool
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
	// errUnknownJob: scontrol answered that it does not know the job, as
	// opposed to scontrol failing (controller down, timeout).
	errUnknownJob = errors.New("Slurm does not know the job")
)

// SubmitError is sbatch refusing the job; User says whether the request
// itself was wrong (bad partition, impossible resources) rather than Slurm
// being unavailable.
type SubmitError struct {
	Msg  string
	User bool
	// down: the controller could not be reached (worth another try).
	down bool
}

func (e *SubmitError) Error() string { return e.Msg }

// markerPrefix starts the batch script's last line; a random nonce per
// submission follows, so a job's own output cannot fake the end by
// accident.
const markerPrefix = "__CI_EXEC_BATCH_END__"

// BatchScript is the script sbatch runs: the command, quoted word by word
// (no word is ever interpreted by the shell) and wrapped by the reaper,
// then the end marker with its exit code. Slurm signals every process of
// the job on scancel, so the command's own TERM traps run; the script only
// reports.
//
// The command's file descriptor 3 is startFile: a command that signals
// its start there (outcome.StartCommand) lets the marker say whether the
// stage's script began ("started=1") or the runtime failed before it
// (exit 127 for a runtime missing on the compute node, ch-run's own
// errors, ...). The file is on the node's view of the job's scripts dir,
// written by the batch script itself, outside any container. The reaper
// hands descriptor 3 on to the command.
func BatchScript(argv []string, nonce, jobName, startFile string, reaper Reaper) string {
	var b strings.Builder
	b.WriteString("#!/bin/sh\n# ci-exec batch script for " + jobName + "\n")
	b.WriteString(reaper.prologue())
	writeCommand(&b, argv, startFile, reaper)
	writeMarker(&b, nonce)
	return b.String()
}

// writeCommand writes the command line and sets rc and started.
func writeCommand(b *strings.Builder, argv []string, startFile string, reaper Reaper) {
	b.WriteString(reaper.prefix())
	for i, a := range argv {
		if i > 0 {
			b.WriteString(" \\\n  ")
		}
		b.WriteString(shellQuote(a))
	}
	sf := shellQuote(startFile)
	b.WriteString(" </dev/null 3>" + sf + "\nrc=$?\n")
	b.WriteString("started=0\n[ -s " + sf + " ] && started=1\n")
}

// writeMarker writes the end marker line and the script's exit.
func writeMarker(b *strings.Builder, nonce string) {
	fmt.Fprintf(b, "printf '\\n%s %s rc=%%d started=%%d\\n' \"$rc\" \"$started\"\nexit \"$rc\"\n", markerPrefix, nonce)
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

// Time limits of the Slurm programs. sbatch may retry a busy controller
// for a while; scontrol and scancel answer at once or not at all.
const (
	submitLimit = 2 * time.Minute
	askLimit    = 30 * time.Second
)

// exitError is a Slurm program that ran and failed; Msg is what it
// printed.
type exitError struct {
	Prog string
	Code int
	Msg  string
}

func (e *exitError) Error() string {
	if e.Msg == "" {
		return fmt.Sprintf("%s exited %d", e.Prog, e.Code)
	}
	return fmt.Sprintf("%s exited %d: %s", e.Prog, e.Code, e.Msg)
}

// errNoAnswer is a Slurm program stopped at its time limit or because ctx
// ended.
var errNoAnswer = errors.New("no answer")

// call runs one Slurm program through proc (own process group, nothing
// left behind, SIGTERM then SIGKILL once ctx or limit ends).
func (s *Slurm) call(ctx context.Context, limit time.Duration, env []string, dir, name string, args ...string) (stdout string, err error) {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	out, errb, res, err := proc.Output(ctx, proc.Cmd{Argv: append([]string{s.program(name)}, args...), Env: env, Dir: dir})
	if err != nil {
		return "", err
	}
	msg := strings.TrimSpace(string(errb))
	if res.Stopped {
		return "", fmt.Errorf("%s %w within %s", name, errNoAnswer, limit)
	}
	if res.ExitCode != 0 {
		if msg == "" {
			msg = strings.TrimSpace(string(out))
		}
		return string(out), &exitError{Prog: name, Code: res.ExitCode, Msg: msg}
	}
	return string(out), nil
}

// Run submits j and follows it until it ends. When ctx ends, the job is
// scancelled (pending or running), given Grace to finish, then killed;
// when ctx ends during the submission itself, sbatch is stopped and any
// job it may have created meanwhile is cancelled by name.
func (s *Slurm) Run(ctx context.Context, j Job) (Result, error) {
	var res Result
	nonceB := make([]byte, 12)
	_, _ = rand.Read(nonceB)
	nonce := hex.EncodeToString(nonceB)
	startFile := j.Script + ".started"
	script := BatchScript(j.Argv, nonce, j.Spec.JobName, startFile, s.Reaper)
	if err := os.WriteFile(j.Script, []byte(script), 0o700); err != nil {
		return res, fmt.Errorf("write the batch script: %w", err)
	}
	_ = os.Remove(j.Spec.Output) // from an earlier attempt
	_ = os.Remove(startFile)
	id, err := s.submit(ctx, j)
	if errors.Is(err, errNoAnswer) {
		// sbatch was stopped: the controller may have queued the job
		// without ci-exec learning its id. Its name is unique to this CI
		// job and stage.
		s.cancelByName(context.WithoutCancel(ctx), j.Spec.JobName)
		if ctx.Err() != nil {
			res.Stopped = true
			return res, nil
		}
		return res, &SubmitError{Msg: fmt.Sprintf("%v; any job it may have queued was cancelled", err)}
	}
	if err != nil {
		return res, err
	}
	res.JobID = id
	s.Logf("Submitted Slurm job %s (%s); output is streamed below.", id, j.Spec.JobName)
	w := &watch{s: s, id: id, tail: newFollower(j.Spec.Output, j.Out, nonce), start: time.Now()}
	return w.follow(ctx, res)
}

func newFollower(path string, out io.Writer, nonce string) *follower {
	return &follower{path: path, out: out, marker: markerPrefix + " " + nonce + " rc="}
}

// follow polls the output file and the job until the stage is over.
func (w *watch) follow(ctx context.Context, res Result) (Result, error) {
	// The output file is read often (cheap, and the end marker makes the
	// end visible at once); Slurm is asked every Poll, and often again
	// once the marker has shown up, to see the job leave.
	fast := min(tailInterval, w.s.Poll)
	tick := time.NewTicker(fast)
	defer tick.Stop()
	var nextState time.Time
	for {
		w.tail.poll()
		if now := time.Now(); w.tail.done || !now.Before(nextState) {
			nextState = now.Add(w.s.Poll)
			if end, err := w.check(ctx, &res); end {
				return res, err
			}
		}
		select {
		case <-ctx.Done():
			return w.stop(context.WithoutCancel(ctx), res), nil
		case <-tick.C:
		}
	}
}

// tailInterval is how often the output file is read.
const tailInterval = 50 * time.Millisecond

// pendingLogEvery is how often a pending job's state, reason and pending
// time are logged, so that a user sees a queue rather than a hang.
const pendingLogEvery = 30 * time.Second

// watch is the state of following one job.
type watch struct {
	s     *Slurm
	id    string
	tail  *follower
	start time.Time
	// alloc is set when the stage runs in the CI job's allocation rather
	// than as a job of its own.
	alloc *allocRun
	// pendingFrom is when the job was submitted, if known (an allocation
	// submitted in prepare): the pending limit counts from there.
	pendingFrom time.Time

	pendingSince, unknownSince, pendingLogged time.Time
	// pendingReason is the reason last logged: a new one is logged at once.
	pendingReason string
}

// fromMarker copies what the end marker reported into res.
func (f *follower) fromMarker(res *Result) {
	if f.done {
		res.ExitCode, res.Signal, res.Marker, res.Started = f.rc, 0, true, f.started
	}
}

// check asks Slurm about the job once; end is true when Run is over.
func (w *watch) check(ctx context.Context, res *Result) (end bool, err error) {
	s, id, tail := w.s, w.id, w.tail
	if w.alloc != nil && tail.done {
		// The allocation runs on after the stage: the marker is the
		// stage's end, and Slurm need not be asked.
		res.State = "COMPLETED"
		if tail.rc != 0 {
			res.State = "FAILED"
		}
		tail.fromMarker(res)
		return true, nil
	}
	st, err := s.state(ctx, id)
	now := time.Now()
	switch {
	case err != nil && ctx.Err() != nil:
		// scontrol was stopped because the stage is: Run stops the job.
		return false, nil
	case err != nil:
		// Not known (any more), or scontrol failed: give it time.
		if w.unknownSince.IsZero() {
			w.unknownSince = now
		}
		if tail.done {
			res.State = "COMPLETED"
			if tail.rc != 0 {
				res.State = "FAILED"
			}
			tail.fromMarker(res)
			return true, nil
		}
		if now.Sub(w.unknownSince) > s.UnknownLimit {
			res.State = "VANISHED"
			// Slurm may only have lost sight of the job (a controller
			// restart or failover, scontrol failing): make sure it does not
			// run on unsupervised once the controller knows it again.
			if errors.Is(err, errUnknownJob) {
				s.Logf("Slurm job %s has been unknown to Slurm for %s (batch.unknown_state_limit); cancelling it (scancel) in case it still exists.", id, s.UnknownLimit)
			} else {
				s.Logf("Slurm could not be asked about job %s for %s (batch.unknown_state_limit: %v); cancelling it (scancel) so that it does not run on unsupervised.", id, s.UnknownLimit, err)
			}
			s.cancel(ctx, id, nil)
			if errors.Is(err, errUnknownJob) {
				return true, fmt.Errorf("%w: Slurm has not known job %s for %s (%v)", ErrVanished, id, s.UnknownLimit, err)
			}
			return true, fmt.Errorf("%w: Slurm could not be asked about job %s for %s (%v)", ErrVanished, id, s.UnknownLimit, err)
		}
	case isFinal(st.State):
		if w.alloc != nil && !tail.done && w.alloc.reclaim() {
			// The allocation ended before it took the stage: the stage
			// never ran.
			res.State, res.ExitCode, res.Signal = st.State, st.ExitCode, st.Signal
			return true, &AllocationEndedError{ID: id, State: st.State, Idle: w.alloc.idle()}
		}
		tail.drain(2 * time.Second)
		res.State = st.State
		res.ExitCode, res.Signal = st.ExitCode, st.Signal
		tail.fromMarker(res)
		return true, nil
	default:
		w.unknownSince = time.Time{}
		if st.State != "PENDING" {
			w.pendingSince = time.Time{}
			if w.alloc != nil && !tail.done {
				if rc, ok := w.alloc.ended(); ok {
					// The allocation ran the stage's script, which ended
					// without its marker (its output file could not be
					// written, say).
					tail.drain(2 * time.Second)
					if !tail.done {
						res.State, res.ExitCode = "FAILED", rc
						return true, nil
					}
				}
			}
			return false, nil
		}
		if w.pendingSince.IsZero() {
			w.pendingSince = cmp.Or(w.pendingFrom, now)
		}
		w.logPending(now, st.Reason)
		if s.PendingLimit > 0 && now.Sub(w.pendingSince) > s.PendingLimit {
			res.PendingReason = st.Reason
			s.cancel(ctx, id, nil)
			s.waitGone(ctx, id, s.Grace+10*time.Second)
			res.State = "CANCELLED"
			return true, ErrPendingLimit
		}
	}
	return false, nil
}

// logPending says that the job waits in the queue, and why: after 5 s,
// then every pendingLogEvery.
func (w *watch) logPending(now time.Time, reason string) {
	first, every := cmp.Or(w.s.pendingFirst, 5*time.Second), cmp.Or(w.s.pendingEvery, pendingLogEvery)
	switch {
	case w.pendingLogged.IsZero():
		if now.Sub(w.start) < first {
			return
		}
	case now.Sub(w.pendingLogged) < every && reason == w.pendingReason:
		return
	}
	w.pendingLogged, w.pendingReason = now, reason
	w.s.Logf("Slurm job %s is PENDING for %s (reason: %s).", w.id, now.Sub(w.pendingSince).Round(time.Second), reason)
}

// stop scancels the job (pending or running: Slurm sends SIGTERM to all
// its processes, so the job's traps run), waits Grace for it to end, then
// kills it, and reports what it wrote. ctx is not the stage's (which has
// ended): stopping must still be able to ask Slurm.
func (w *watch) stop(ctx context.Context, res Result) Result {
	s, id := w.s, w.id
	res.Stopped = true
	s.Logf("Cancelling Slurm job %s (scancel).", id)
	s.cancel(ctx, id, nil)
	final := s.waitGone(ctx, id, s.Grace)
	if final == "" {
		s.Logf("Slurm job %s did not end within %s: sending SIGKILL.", id, s.Grace)
		res.Killed = true
		s.cancel(ctx, id, []string{"--signal=KILL", "--full"})
		final = s.waitGone(ctx, id, cmp.Or(s.killWait, 10*time.Second))
	}
	w.tail.drain(time.Second)
	res.State = final
	w.tail.fromMarker(&res)
	return res
}

// submit runs sbatch --parsable with the batch script as its argument,
// up to SubmitAttempts times while the controller cannot be reached.
func (s *Slurm) submit(ctx context.Context, j Job) (string, error) {
	attempts := max(s.SubmitAttempts, 1)
	for i := 1; ; i++ {
		id, err := s.submitOnce(ctx, j)
		var se *SubmitError
		if !errors.As(err, &se) || !se.down || i >= attempts {
			if se != nil && se.down && attempts > 1 {
				se.Msg += fmt.Sprintf(" (%d attempts)", attempts)
			}
			return id, err
		}
		delay := cmp.Or(s.retryDelay, 5*time.Second)
		s.Logf("Slurm's controller cannot be reached (%s); submitting again in %s.", se.Msg, delay)
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("sbatch %w: the stage was stopped while waiting to retry", errNoAnswer)
		case <-time.After(delay):
		}
	}
}

func (s *Slurm) submitOnce(ctx context.Context, j Job) (string, error) {
	args := append(SbatchArgs(j.Spec), j.Script)
	out, err := s.call(ctx, submitLimit, submitEnv(j.Env, s.Env), j.Spec.Chdir, "sbatch", args...)
	var ee *exitError
	var se *proc.StartError
	switch {
	case errors.As(err, &ee):
		return "", classifySubmit(ee.Msg)
	case errors.As(err, &se):
		return "", &SubmitError{Msg: fmt.Sprintf("cannot run sbatch: %v (set batch.scheduler_bin to the directory of sbatch)", se.Err)}
	case errors.Is(err, errNoAnswer):
		return "", err
	case err != nil:
		return "", &SubmitError{Msg: err.Error()}
	}
	id, _, _ := strings.Cut(strings.TrimSpace(out), ";")
	if !jobIDRE().MatchString(id) {
		return "", &SubmitError{Msg: fmt.Sprintf("sbatch printed no job id: %q", out)}
	}
	return id, nil
}

// submitEnv is sbatch's environment: the job's, without any SBATCH_ or
// SLURM_ variable, plus the controller's SLURM_CONF from controller.
// sbatch reads SBATCH_* as options (SBATCH_ARRAY_INX, SBATCH_WAIT,
// SBATCH_CLUSTERS would each undo an option ci-exec owns or refuses) and
// SLURM_CLUSTERS / SLURM_CONF pick the cluster; with --export=ALL the job
// would also inherit a stale SLURM_JOB_ID. Slurm sets the job's own
// SLURM_ variables on the node.
func submitEnv(job, controller []string) []string {
	out := make([]string, 0, len(job)+1)
	for _, kv := range job {
		if strings.HasPrefix(kv, "SBATCH_") || strings.HasPrefix(kv, "SLURM_") {
			continue
		}
		out = append(out, kv)
	}
	for _, kv := range controller {
		if strings.HasPrefix(kv, "SLURM_CONF=") {
			out = append(out, kv)
		}
	}
	return out
}

var jobIDRE = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^[0-9]+$`) })

// classifySubmit tells a request Slurm refuses (the user's to fix) from
// Slurm being unavailable.
func classifySubmit(msg string) error {
	msg = strings.TrimSpace(msg)
	last := msg
	if i := strings.LastIndex(msg, "\n"); i >= 0 {
		last = strings.TrimSpace(msg[i+1:])
	}
	down := []string{"Unable to contact slurm controller", "Socket timed out", "Connection refused",
		"Slurm backup controller in standby mode", "Zero Bytes were transmitted", "Communication connection failure",
		"Unable to allocate resources: Slurm temporarily unable"}
	for _, u := range down {
		if strings.Contains(last, u) {
			return &SubmitError{Msg: last, down: true}
		}
	}
	for _, u := range []string{"executable file not found", "no such file or directory"} {
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
	stateRE    = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`\bJobState=(\S+)`) })
	reasonRE   = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`\bReason=(\S+)`) })
	exitCodeRE = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`\bExitCode=([0-9]+):([0-9]+)`) })
)

// ParseJob reads one line of `scontrol show job -o`.
func ParseJob(line string) (jobState, error) {
	m := stateRE().FindStringSubmatch(line)
	if m == nil {
		return jobState{}, fmt.Errorf("no JobState in %q", strings.TrimSpace(line))
	}
	st := jobState{State: m[1]}
	if r := reasonRE().FindStringSubmatch(line); r != nil {
		st.Reason = r[1]
	}
	if e := exitCodeRE().FindStringSubmatch(line); e != nil {
		st.ExitCode, _ = strconv.Atoi(e[1])
		st.Signal, _ = strconv.Atoi(e[2])
	}
	return st, nil
}

// state asks scontrol about the job. An error wrapping errUnknownJob
// means Slurm answered and does not know it; any other error means the
// answer is unknown.
func (s *Slurm) state(ctx context.Context, id string) (jobState, error) {
	// scontrol waits for a controller that is down (18 s with Slurm's
	// defaults); within a short unknown_state_limit it must not wait
	// longer than that limit.
	limit := askLimit
	if s.UnknownLimit > 0 && s.UnknownLimit < limit {
		limit = max(s.UnknownLimit, 2*time.Second)
	}
	out, err := s.call(ctx, limit, s.Env, "", "scontrol", "show", "job", "-o", id)
	var ee *exitError
	if errors.As(err, &ee) && strings.Contains(ee.Msg, "Invalid job id specified") {
		return jobState{}, fmt.Errorf("%w (scontrol show job %s: %s)", errUnknownJob, id, ee.Msg)
	}
	if err != nil {
		return jobState{}, fmt.Errorf("scontrol show job %s: %w", id, err)
	}
	return ParseJob(out)
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

func (s *Slurm) cancel(ctx context.Context, id string, extra []string) {
	if _, err := s.call(ctx, askLimit, s.Env, "", "scancel", append(extra, id)...); err != nil {
		s.Logf("scancel %s: %v", id, err)
	}
}

// cancelByName cancels the user's jobs named name (a submission whose
// answer ci-exec never got).
func (s *Slurm) cancelByName(ctx context.Context, name string) {
	user := s.User
	if user == "" {
		user = envValue(s.Env, "USER")
	}
	args := []string{"--name=" + name}
	if user != "" {
		// Without it, a root runner would cancel every user's job of
		// that name.
		args = append(args, "--user="+user)
	}
	if _, err := s.call(ctx, askLimit, s.Env, "", "scancel", args...); err != nil {
		s.Logf("scancel %s: %v", strings.Join(args, " "), err)
	}
}

func envValue(env []string, key string) string {
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, key+"="); ok {
			return v
		}
	}
	return ""
}

// waitGone waits until the job is in a final state (and no longer
// COMPLETING) and returns that state, "GONE" when Slurm answers that it
// does not know the job (it ended and was purged), or "" after limit,
// also when scontrol keeps failing: a controller that cannot be asked
// must not pass for a job that ended, or the SIGKILL would be skipped.
func (s *Slurm) waitGone(ctx context.Context, id string, limit time.Duration) string {
	deadline := time.Now().Add(limit)
	for {
		st, err := s.state(ctx, id)
		switch {
		case errors.Is(err, errUnknownJob):
			return "GONE"
		case err == nil && isFinal(st.State):
			return st.State
		}
		if time.Now().After(deadline) {
			return ""
		}
		time.Sleep(s.Poll)
	}
}

// follower copies a growing output file to out, holding back the end
// marker. The file may appear late (the job has not started, or the
// compute node's write is not visible yet) and grow slowly.
//
// Memory stays bounded whatever the job prints: the file is read in
// readChunk pieces, and only the start of a line that may still become
// the marker is held (at most markerHold bytes); any other partial line
// is copied as it arrives, so one 50 MB line without a newline passes
// through a buffer of 64 KiB.
type follower struct {
	path   string
	out    io.Writer
	marker string // "__CI_EXEC_BATCH_END__ NONCE rc="
	off    int64
	// part is the held start of the current line; flushed says that the
	// current line's start has been copied already (it is not the marker).
	part    []byte
	flushed bool
	done    bool
	rc      int
	started bool
	// blank is an empty line held back: the marker is printed after a
	// newline of its own, which is not the job's output.
	blank bool
	buf   []byte
}

const (
	readChunk = 64 << 10
	// markerHold is longer than any marker line ("... rc=255 started=1").
	markerHold = 32
)

// poll copies what was added since the last call.
func (f *follower) poll() {
	if f.done {
		return
	}
	fh, err := os.Open(f.path)
	if err != nil {
		return
	}
	defer fh.Close()
	if _, err := fh.Seek(f.off, io.SeekStart); err != nil {
		return
	}
	if f.buf == nil {
		f.buf = make([]byte, readChunk)
	}
	for !f.done {
		n, err := fh.Read(f.buf)
		f.off += int64(n)
		f.feed(f.buf[:n])
		if err != nil || n == 0 {
			return
		}
	}
}

// feed processes one piece of the file.
func (f *follower) feed(p []byte) {
	for len(p) > 0 && !f.done {
		i := bytes.IndexByte(p, '\n')
		if i < 0 {
			f.partial(p)
			return
		}
		line := p[:i+1]
		p = p[i+1:]
		if f.flushed {
			f.write(line)
			f.flushed = false
			continue
		}
		if len(f.part) == 0 {
			f.emit(line)
			continue
		}
		f.part = append(f.part, line...)
		f.emit(f.part)
		f.part = f.part[:0]
	}
}

// partial handles the start of a line that has no newline yet.
func (f *follower) partial(p []byte) {
	if f.flushed {
		f.write(p)
		return
	}
	if len(f.part)+len(p) <= len(f.marker)+markerHold {
		f.part = append(f.part, p...)
		if f.mayBeMarker(f.part) {
			return
		}
		p = nil
	}
	f.unblank()
	f.write(f.part)
	f.write(p)
	f.part = f.part[:0]
	f.flushed = true
}

// mayBeMarker reports whether a partial line may still turn into the end
// marker line.
func (f *follower) mayBeMarker(part []byte) bool {
	if len(part) <= len(f.marker) {
		return strings.HasPrefix(f.marker, string(part))
	}
	return len(part) <= len(f.marker)+markerHold && strings.HasPrefix(string(part), f.marker)
}

func (f *follower) write(p []byte) {
	if len(p) > 0 {
		_, _ = f.out.Write(p)
	}
}

func (f *follower) unblank() {
	if f.blank {
		f.write([]byte("\n"))
		f.blank = false
	}
}

// emit handles one complete line that was not copied in part.
func (f *follower) emit(line []byte) {
	text := strings.TrimRight(string(line), "\n")
	if rest, ok := strings.CutPrefix(text, f.marker); ok {
		if rc, started, ok := parseMarker(rest); ok {
			f.done, f.rc, f.started, f.blank = true, rc, started, false
			return
		}
	}
	f.unblank()
	if text == "" {
		f.blank = true
		return
	}
	f.write(line)
}

// parseMarker reads "N started=S" (or "N", from an older batch script).
func parseMarker(rest string) (rc int, started, ok bool) {
	code, flag, hasFlag := strings.Cut(rest, " started=")
	rc, err := strconv.Atoi(code)
	if err != nil {
		return 0, false, false
	}
	if !hasFlag {
		return rc, false, true
	}
	switch flag {
	case "0":
		return rc, false, true
	case "1":
		return rc, true, true
	}
	return 0, false, false
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
	f.unblank()
	switch {
	case len(f.part) > 0:
		f.write(append(f.part, '\n'))
		f.part = f.part[:0]
	case f.flushed:
		f.write([]byte("\n"))
		f.flushed = false
	}
}
