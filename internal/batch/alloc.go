package batch

import (
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
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ci-exec/ci-exec/internal/atomicfile"
)

// An allocation is one Slurm batch job per CI job, submitted in prepare,
// so that its queue wait runs while the runner clones, restores caches and
// downloads artifacts on the login node. Its batch script is a small
// agent: it waits for stage scripts in a queue dir on shared storage and
// runs each one as its own child, exactly as a per-stage batch script
// would run (the same environment, Slurm's variables, `ci-exec reap`, the
// end marker in the stage's own output file). The stage's process on the
// login node hands the script over with one rename and follows the output
// file and the allocation's state as it follows a per-stage job.
//
// The queue dir holds:
//
//	agent.sh, agent.out  the allocation's batch script and its output
//	next.N               the stage script waiting to be taken (renamed into
//	                     place by the login node; N is the stage's nonce)
//	running.N            the stage script being run (renamed from next.N by
//	                     the agent: whoever renames next.N first owns it)
//	ended.N              the script's exit status, once it is over (named
//	                     per stage, so a late one of the previous stage is
//	                     never taken for this one's)
//	release              written by cleanup: the agent exits at once
//	idle                 written by the agent when it exits after idle_limit

// Allocation is a CI job's allocation as the job's state keeps it.
type Allocation struct {
	// ID is the Slurm job id and Name its job name.
	ID   string `json:"id"`
	Name string `json:"name"`
	// Dir is the queue dir (on storage the compute nodes see).
	Dir string `json:"dir"`
	// Submitted is when sbatch accepted it (the pending limit counts from
	// there).
	Submitted time.Time `json:"submitted"`
	// EnvKeys are the variables the agent was submitted with: a stage
	// script unsets those its own environment does not have.
	EnvKeys []string `json:"env_keys"`
	// Released is set once it was ended (after the last user-script
	// stage, a failed clone, or cleanup).
	Released bool `json:"released,omitempty"`
}

// AllocationEndedError is an allocation that reached a final state before
// it took the stage: the stage never ran. Idle says it ended itself after
// idle_limit without a stage.
type AllocationEndedError struct {
	ID    string
	State string
	Idle  bool
}

func (e *AllocationEndedError) Error() string {
	if e.Idle {
		return fmt.Sprintf("Slurm allocation %s ended after batch.idle_limit without a stage to run", e.ID)
	}
	return fmt.Sprintf("Slurm allocation %s ended (%s) before it ran the stage", e.ID, e.State)
}

// AgentScript is the allocation's batch script: a shell loop that runs the
// stage scripts renamed into dir/next.N, one at a time, writes each one's
// exit status to dir/ended.N, and exits when dir/release appears or after
// idle without a stage. TERM (scancel) is trapped only so the loop waits
// for the running stage to end first (the stage gets the signal from Slurm
// itself, and its own traps run); a trapped signal is reset to the default
// in the children, unlike an ignored one.
func AgentScript(dir, jobName string, idle time.Duration) string {
	q := shellQuote(dir)
	// The loop sleeps 50 ms between looks (so a stage waits at most that
	// long to start); idle is counted in those ticks, which makes the
	// limit approximate (slightly longer).
	ticks := int64(idle / (50 * time.Millisecond))
	return fmt.Sprintf(`#!/bin/sh
# ci-exec allocation %s: runs the CI job's stage scripts as they arrive
q=%s
trap 'exit 143' TERM INT
n=0
while :; do
  for f in "$q"/next.*; do
    [ -e "$f" ] || continue
    s=${f#"$q/next."}
    mv "$f" "$q/running.$s" 2>/dev/null || continue
    /bin/sh "$q/running.$s"
    rc=$?
    rm -f "$q/running.$s"
    printf '%%s\n' "$rc" > "$q/ended.$s.tmp" && mv "$q/ended.$s.tmp" "$q/ended.$s"
    n=0
  done
  [ -e "$q/release" ] && exit 0
  n=$((n+1))
  if [ "$n" -gt %d ]; then
    : > "$q/idle"
    echo "ci-exec: no stage to run for %s (batch.idle_limit): ending the allocation"
    exit 0
  fi
  sleep 0.05
done
`, jobName, q, ticks, idle)
}

// Allocate submits the CI job's allocation (see AgentScript) and returns
// at once: the job may pend. env is the agent's environment (and so every
// stage's, see StageScript).
func (s *Slurm) Allocate(ctx context.Context, spec SubmitSpec, env []string, dir string, idle time.Duration) (*Allocation, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create the allocation's dir: %w", err)
	}
	for _, f := range []string{"next", "running", "ended", "release", "idle"} {
		_ = os.Remove(filepath.Join(dir, f)) // from an earlier prepare attempt
	}
	script := filepath.Join(dir, "agent.sh")
	if err := os.WriteFile(script, []byte(AgentScript(dir, spec.JobName, idle)), 0o700); err != nil {
		return nil, fmt.Errorf("write the allocation's batch script: %w", err)
	}
	spec.Output, spec.Chdir = filepath.Join(dir, "agent.out"), dir
	id, err := s.submit(ctx, Job{Spec: spec, Env: env, Script: script})
	if errors.Is(err, errNoAnswer) {
		s.cancelByName(context.WithoutCancel(ctx), spec.JobName)
		return nil, &SubmitError{Msg: fmt.Sprintf("%v; any job it may have queued was cancelled", err)}
	}
	if err != nil {
		return nil, err
	}
	keys := make([]string, 0, len(env))
	for _, kv := range submitEnv(env, s.Env) {
		k, _, _ := strings.Cut(kv, "=")
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return &Allocation{ID: id, Name: spec.JobName, Dir: dir, Submitted: time.Now(), EnvKeys: keys}, nil
}

// StageJob is one stage to run in an allocation.
type StageJob struct {
	// Name names the stage in the script's header (the per-stage job name).
	Name string
	// Argv, Env and Dir are the stage's command, complete environment and
	// working directory.
	Argv []string
	Env  []string
	Dir  string
	// Script is where the stage script is written (the start file is
	// Script + ".started"), Output the stage's output file.
	Script, Output string
	// Out receives the output as it grows.
	Out io.Writer
}

// envNameRE is what a POSIX shell can export.
var envNameRE = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`) })

// StageScript is the script the allocation runs for one stage: its output
// goes to the stage's own file, its environment becomes the stage's (the
// agent's variables it does not have are unset, Slurm's own stay, as in a
// per-stage job submitted with --export=ALL), then it runs the command in
// dir as BatchScript does. The values are in this file (mode 0700, in the
// job's private dir, like the runner's own script copy), never on a
// command line. Variables whose names a shell cannot export are skipped
// and returned.
func StageScript(j StageJob, nonce string, agentKeys []string, reaper Reaper) (script string, skipped []string) {
	var b strings.Builder
	b.WriteString("#!/bin/sh\n# ci-exec stage script for " + j.Name + "\n")
	b.WriteString("exec >" + shellQuote(j.Output) + " 2>&1 </dev/null\n")
	have := map[string]bool{}
	for _, kv := range j.Env {
		k, _, _ := strings.Cut(kv, "=")
		have[k] = true
	}
	for _, k := range agentKeys {
		if !have[k] && !strings.HasPrefix(k, "SLURM_") && envNameRE().MatchString(k) {
			b.WriteString("unset " + shellQuote(k) + "\n")
		}
	}
	for _, kv := range j.Env {
		k, _, _ := strings.Cut(kv, "=")
		if !envNameRE().MatchString(k) || strings.HasPrefix(k, "SLURM_") || strings.HasPrefix(k, "SBATCH_") {
			skipped = append(skipped, k)
			continue
		}
		b.WriteString("export " + shellQuote(kv) + "\n")
	}
	b.WriteString("if cd " + shellQuote(j.Dir) + "; then\n")
	b.WriteString(reaper.prologue())
	writeCommand(&b, j.Argv, j.Script+".started", reaper)
	b.WriteString("else\n  rc=1 started=0\nfi\n")
	writeMarker(&b, nonce)
	return b.String(), skipped
}

// RunIn runs one stage in the allocation a and follows it to its end like
// Run: the output is streamed, the end marker gives the exit code, and
// when ctx ends the allocation is scancelled (its processes get SIGTERM,
// so the stage's traps run), then killed after Grace. An allocation that
// ended before taking the stage returns *AllocationEndedError.
func (s *Slurm) RunIn(ctx context.Context, a *Allocation, j StageJob) (Result, error) {
	res := Result{JobID: a.ID}
	nonceB := make([]byte, 12)
	_, _ = rand.Read(nonceB)
	nonce := hex.EncodeToString(nonceB)
	script, skipped := StageScript(j, nonce, a.EnvKeys, s.Reaper)
	if len(skipped) > 0 {
		s.Logf("WARNING: not passed to the stage in the Slurm allocation (not shell variable names, or Slurm's own): %s", strings.Join(skipped, ", "))
	}
	if err := os.WriteFile(j.Script, []byte(script), 0o700); err != nil {
		return res, fmt.Errorf("write the stage script: %w", err)
	}
	_ = os.Remove(j.Output)
	_ = os.Remove(j.Script + ".started")
	// One rename hands the script over: the agent never sees half of it.
	if err := atomicfile.Write(filepath.Join(a.Dir, "next."+nonce), []byte(script), 0o700, atomicfile.Volatile); err != nil {
		return res, fmt.Errorf("hand the stage to the allocation: %w", err)
	}
	s.Logf("Running %s in Slurm allocation %s (%s); output is streamed below.", j.Name, a.ID, a.Name)
	w := &watch{s: s, id: a.ID, tail: newFollower(j.Output, j.Out, nonce), start: time.Now(),
		alloc: &allocRun{dir: a.Dir, nonce: nonce}, pendingFrom: a.Submitted}
	return w.follow(ctx, res)
}

// Release ends the allocation: the agent exits at its next look, and
// scancel ends it wherever it is (pending, or running a stage).
func (s *Slurm) Release(ctx context.Context, a *Allocation) error {
	_ = os.WriteFile(filepath.Join(a.Dir, "release"), nil, 0o600)
	if waiting, _ := filepath.Glob(filepath.Join(a.Dir, "next.*")); len(waiting) > 0 {
		for _, f := range waiting {
			_ = os.Remove(f)
		}
	}
	return s.Cancel(ctx, a.ID)
}

// allocRun is the login node's side of the queue dir for one stage.
type allocRun struct{ dir, nonce string }

// reclaim takes the stage script back if the agent never took it: the
// rename succeeds only while it is still waiting.
func (r *allocRun) reclaim() bool {
	// Not a next.* name: the agent must not take it meanwhile.
	unrun := filepath.Join(r.dir, "unrun."+r.nonce)
	if os.Rename(filepath.Join(r.dir, "next."+r.nonce), unrun) != nil {
		return false
	}
	_ = os.Remove(unrun)
	return true
}

// ended reports the stage script's exit status once the agent says it is
// over.
func (r *allocRun) ended() (int, bool) {
	f := filepath.Join(r.dir, "ended."+r.nonce)
	b, err := os.ReadFile(f)
	if err != nil {
		return 0, false
	}
	_ = os.Remove(f)
	rc, err := strconv.Atoi(strings.TrimSpace(string(b)))
	return rc, err == nil
}

// idle reports whether the agent ended itself for want of a stage.
func (r *allocRun) idle() bool {
	_, err := os.Stat(filepath.Join(r.dir, "idle"))
	return err == nil
}

// Listed is one of the user's Slurm jobs that carries a CI job's identity.
type Listed struct {
	ID       string
	State    string
	Identity Identity
}

// ListCI lists the user's queued and running jobs whose comment is a CI
// job's identity (see Identity.Comment). Other jobs are not listed.
func (s *Slurm) ListCI(ctx context.Context) ([]Listed, error) {
	user := cmp.Or(s.User, envValue(s.Env, "USER"))
	if user == "" {
		return nil, errors.New("no user to list the jobs of")
	}
	out, err := s.call(ctx, askLimit, s.Env, "", "squeue", "--noheader", "--user="+user, "--format=%i|%T|%k")
	if err != nil {
		return nil, err
	}
	var jobs []Listed
	for _, line := range strings.Split(out, "\n") {
		f := strings.SplitN(line, "|", 3)
		if len(f) != 3 || !jobIDRE().MatchString(strings.TrimSpace(f[0])) {
			continue
		}
		if id, ok := ParseComment(f[2]); ok {
			jobs = append(jobs, Listed{ID: strings.TrimSpace(f[0]), State: strings.TrimSpace(f[1]), Identity: id})
		}
	}
	return jobs, nil
}

// Cancel scancels one job. A job that has ended already, or that Slurm no
// longer knows, is not an error.
func (s *Slurm) Cancel(ctx context.Context, id string) error {
	_, err := s.call(ctx, askLimit, s.Env, "", "scancel", id)
	var ee *exitError
	if errors.As(err, &ee) && (strings.Contains(ee.Msg, "already completing or completed") || strings.Contains(ee.Msg, "Invalid job id")) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("scancel %s: %w", id, err)
	}
	return nil
}
