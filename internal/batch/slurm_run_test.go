package batch

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The fake Slurm keeps its state in files next to the programs ($d):
//
//	sbatch.args     sbatch's arguments, one a line
//	sbatch.stderr   if present: sbatch prints it to stderr and exits 1
//	sbatch.failonce if present: the same, once (the file is removed)
//	sbatch.count    one line per sbatch call
//	sbatch.stdout   if present: sbatch prints it instead of "42"
//	hold            if present: the job is never started (PENDING)
//	state           scontrol's answer once the job ended or was cancelled
//	scontrol.fail   if present: scontrol fails like for an unknown job
//	scontrol.down   if present: scontrol fails like for a controller down
//	sbatch.block    if present: sbatch hangs (its pid in sbatch.pid)
//	sbatch.env      sbatch's environment
//	scontrol.calls  scontrol's arguments, one call a line
//	scancel.calls   scancel's arguments, one call a line
//	scancel.ignore  if present: a plain scancel does not end the job
//	job.pid         the batch script's process (group) id
const fakeSbatch = `#!/bin/sh
d=$(dirname "$0")
printf '%s\n' "$@" > "$d/sbatch.args"
env > "$d/sbatch.env"
if [ -f "$d/sbatch.block" ]; then echo $$ > "$d/sbatch.pid.tmp"; mv "$d/sbatch.pid.tmp" "$d/sbatch.pid"; exec sleep 600; fi
echo x >> "$d/sbatch.count"
if [ -f "$d/sbatch.failonce" ]; then cat "$d/sbatch.failonce" >&2; rm -f "$d/sbatch.failonce"; exit 1; fi
if [ -f "$d/sbatch.stderr" ]; then cat "$d/sbatch.stderr" >&2; exit 1; fi
out= script=
for a in "$@"; do
	case "$a" in --output=*) out=${a#--output=} ;; esac
	script=$a
done
[ -n "$out" ] || { echo "sbatch: error: fake: no --output" >&2; exit 1; }
if [ ! -f "$d/hold" ]; then
	# Like slurmd, the job runs outside sbatch's process group: sbatch's
	# caller kills that group once sbatch has answered, so sbatch answers
	# only once the job has left it (the fifo says so).
	rm -f "$d/left.fifo"; mkfifo "$d/left.fifo"
	setsid /bin/sh -c '
		d=$1 script=$2 out=$3
		echo $$ > "$d/monitor.pid.tmp"; mv "$d/monitor.pid.tmp" "$d/monitor.pid"
		setsid /bin/sh "$script" > "$out" 2>&1 &
		echo $! > "$d/job.pid.tmp"; mv "$d/job.pid.tmp" "$d/job.pid"
		echo left > "$d/left.fifo"
		wait $!
		rc=$?
		if [ ! -f "$d/state" ]; then
			st=COMPLETED; [ "$rc" = 0 ] || st=FAILED
			echo "JobId=42 JobName=x UserId=ci(1000) JobState=$st Reason=None Dependency=(null) ExitCode=$rc:0 RunTime=00:00:01" > "$d/state.tmp"
			mv "$d/state.tmp" "$d/state"
		fi' sh "$d" "$script" "$out" </dev/null >/dev/null 2>&1 &
	read -r _ < "$d/left.fifo"
fi
if [ -f "$d/sbatch.stdout" ]; then cat "$d/sbatch.stdout"; else echo 42; fi
`

const fakeScontrol = `#!/bin/sh
d=$(dirname "$0")
echo "$*" >> "$d/scontrol.calls"
if [ "$*" != "show job -o 42" ]; then echo "fake scontrol: unexpected arguments: $*" >&2; exit 2; fi
if [ -f "$d/scontrol.fail" ]; then echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1; fi
if [ -f "$d/scontrol.down" ]; then echo "slurm_load_jobs error: Unable to contact slurm controller (connect failure)" >&2; exit 1; fi
if [ -f "$d/state" ]; then cat "$d/state"; exit 0; fi
if [ -f "$d/hold" ]; then
	echo "JobId=42 JobName=x UserId=ci(1000) Priority=0 JobState=PENDING Reason=JobHeldUser Dependency=(null) ExitCode=0:0"
	exit 0
fi
echo "JobId=42 JobName=x UserId=ci(1000) JobState=RUNNING Reason=None Dependency=(null) ExitCode=0:0 RunTime=00:00:01"
`

const fakeScancel = `#!/bin/sh
d=$(dirname "$0")
echo "$*" >> "$d/scancel.calls"
case "$*" in
*--signal=KILL*) sig=KILL ;;
*) sig=TERM; [ -f "$d/scancel.ignore" ] && exit 0 ;;
esac
echo "JobId=42 JobName=x UserId=ci(1000) JobState=CANCELLED Reason=None Dependency=(null) ExitCode=0:15" > "$d/state.tmp"
mv "$d/state.tmp" "$d/state"
[ -f "$d/job.pid" ] && kill -$sig -- -$(cat "$d/job.pid") 2>/dev/null
exit 0
`

// syncBuffer is a Job.Out that may be read while Run writes to it.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

type fakeSlurm struct {
	t    *testing.T
	bin  string // the programs and their state
	work string // the job's directory
	logs syncBuffer
}

func newFakeSlurm(t *testing.T) *fakeSlurm {
	f := &fakeSlurm{t: t, bin: t.TempDir(), work: t.TempDir()}
	for name, text := range map[string]string{"sbatch": fakeSbatch, "scontrol": fakeScontrol, "scancel": fakeScancel} {
		require.NoError(t, os.WriteFile(filepath.Join(f.bin, name), []byte(text), 0o755))
	}
	t.Cleanup(func() {
		// End what a test left running: the fake slurmd (first, so it
		// writes no state file into a directory being removed), the batch
		// script, a hanging sbatch; then wait until they are gone.
		var pids []int
		for _, name := range []string{"monitor.pid", "job.pid", "sbatch.pid"} {
			b, err := os.ReadFile(filepath.Join(f.bin, name))
			if err != nil {
				continue
			}
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 1 {
				if name != "sbatch.pid" {
					_ = syscall.Kill(-pid, syscall.SIGKILL) // its own session and group
				}
				_ = syscall.Kill(pid, syscall.SIGKILL)
				pids = append(pids, pid)
			}
		}
		for _, pid := range pids {
			assert.Eventually(t, func() bool { return dead(pid) }, 10*time.Second, 5*time.Millisecond,
				"process %d of the fake Slurm did not end", pid)
		}
	})
	return f
}

// dead reports whether pid has ended: gone, or a zombie (its new parent,
// PID 1, reaps it in its own time).
func dead(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	i := bytes.LastIndexByte(b, ')')
	return i >= 0 && i+2 < len(b) && b[i+2] == 'Z'
}

func (f *fakeSlurm) slurm() *Slurm {
	return &Slurm{
		Bin:          f.bin,
		Poll:         20 * time.Millisecond,
		UnknownLimit: 2 * time.Second,
		Grace:        2 * time.Second,
		Logf: func(format string, args ...any) {
			fmt.Fprintf(&f.logs, format+"\n", args...)
		},
	}
}

func (f *fakeSlurm) job(out *syncBuffer, argv ...string) Job {
	return Job{
		Spec: SubmitSpec{
			JobName:  "ci-7-build_script",
			Output:   filepath.Join(f.work, "build.slurm.out"),
			Chdir:    f.work,
			UserArgs: []string{"-N", "1"},
		},
		Argv:   argv,
		Env:    os.Environ(),
		Script: filepath.Join(f.work, "build.slurm.sh"),
		Out:    out,
	}
}

func (f *fakeSlurm) touch(name, content string) {
	require.NoError(f.t, os.WriteFile(filepath.Join(f.bin, name), []byte(content), 0o644))
}

func (f *fakeSlurm) lines(name string) []string {
	b, err := os.ReadFile(filepath.Join(f.bin, name))
	if err != nil {
		return nil
	}
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

func runCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func TestRunStreamsOutputAndExitCode(t *testing.T) {
	tests := map[string]struct {
		cmd   string
		out   string
		rc    int
		state string
	}{
		"success": {cmd: "echo hello; sleep 0.1; echo world", out: "hello\nworld\n", rc: 0, state: "COMPLETED"},
		"exit 7":  {cmd: "echo before; sleep 0.1; printf 'partial'; exit 7", out: "before\npartial\n", rc: 7, state: "FAILED"},
		"words":   {cmd: `printf '[%s]\n' "$@"`, out: "[a b]\n[it's]\n[$(touch x)]\n[]\n", rc: 0, state: "COMPLETED"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			f := newFakeSlurm(t)
			var out syncBuffer
			j := f.job(&out, "/bin/sh", "-c", tc.cmd, "sh", "a b", "it's", "$(touch x)", "")
			require.NoError(t, os.WriteFile(j.Spec.Output, []byte("stale output of an earlier attempt\n"), 0o600))

			res, err := f.slurm().Run(runCtx(t, 20*time.Second), j)
			require.NoError(t, err)
			assert.Equal(t, tc.out, out.String())
			assert.Equal(t, Result{JobID: "42", State: tc.state, ExitCode: tc.rc, Marker: true}, res)
			assert.NoFileExists(t, filepath.Join(f.work, "x"))

			args := f.lines("sbatch.args")
			want := append(SbatchArgs(j.Spec), j.Script)
			assert.Equal(t, want, args, "sbatch gets the spec's arguments and the script")
			script, err := os.ReadFile(j.Script)
			require.NoError(t, err)
			assert.True(t, strings.HasPrefix(string(script), "#!/bin/sh\n# ci-exec batch script for ci-7-build_script\n"))
			assert.Contains(t, f.logs.String(), "Submitted Slurm job 42 (ci-7-build_script)")
			assert.Empty(t, f.lines("scancel.calls"))
		})
	}
}

func TestRunStreamsWhileRunning(t *testing.T) {
	f := newFakeSlurm(t)
	var out syncBuffer
	j := f.job(&out, "/bin/sh", "-c", `echo first; while [ ! -f "$1" ]; do sleep 0.02; done; echo second`, "sh", filepath.Join(f.work, "go-on"))
	type ret struct {
		res Result
		err error
	}
	done := make(chan ret, 1)
	go func() {
		res, err := f.slurm().Run(runCtx(t, 20*time.Second), j)
		done <- ret{res, err}
	}()
	require.Eventually(t, func() bool { return out.String() == "first\n" }, 10*time.Second, 10*time.Millisecond,
		"the first line is streamed while the job runs")
	require.NoError(t, os.WriteFile(filepath.Join(f.work, "go-on"), nil, 0o600))
	r := <-done
	require.NoError(t, r.err)
	assert.Equal(t, "first\nsecond\n", out.String())
	assert.Equal(t, 0, r.res.ExitCode)
	assert.True(t, r.res.Marker)
}

func TestRunMarkerBeatsScontrolExitCode(t *testing.T) {
	f := newFakeSlurm(t)
	// Slurm says the job failed with 1 (say, an epilog); the marker says 0.
	require.NoError(t, os.WriteFile(filepath.Join(f.bin, "scontrol"), []byte(strings.Replace(fakeScontrol,
		`if [ -f "$d/state" ]; then cat "$d/state"; exit 0; fi`,
		`if [ -f "$d/state" ]; then echo "JobId=42 JobState=FAILED Reason=NonZeroExitCode ExitCode=1:0"; exit 0; fi`, 1)), 0o755))
	var out syncBuffer
	res, err := f.slurm().Run(runCtx(t, 20*time.Second), f.job(&out, "/bin/sh", "-c", "echo ok"))
	require.NoError(t, err)
	assert.Equal(t, Result{JobID: "42", State: "FAILED", ExitCode: 0, Marker: true}, res)
	assert.Equal(t, "ok\n", out.String())
}

func TestRunSubmitRefused(t *testing.T) {
	tests := map[string]struct {
		stderr string
		user   bool
	}{
		"bad partition":   {stderr: "sbatch: error: Batch job submission failed: Invalid partition name specified\n", user: true},
		"controller down": {stderr: "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)\n"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			f := newFakeSlurm(t)
			f.touch("sbatch.stderr", tc.stderr)
			var out syncBuffer
			res, err := f.slurm().Run(runCtx(t, 20*time.Second), f.job(&out, "true"))
			var se *SubmitError
			require.True(t, errors.As(err, &se), "want *SubmitError, got %T: %v", err, err)
			assert.Equal(t, strings.TrimSpace(tc.stderr), se.Msg)
			assert.Equal(t, tc.user, se.User)
			assert.Empty(t, res.JobID)
			assert.Empty(t, f.lines("scontrol.calls"), "nothing to follow")
		})
	}

	t.Run("no job id printed", func(t *testing.T) {
		f := newFakeSlurm(t)
		f.touch("hold", "")
		f.touch("sbatch.stdout", "Submitted batch job 42\n")
		_, err := f.slurm().Run(runCtx(t, 20*time.Second), f.job(&syncBuffer{}, "true"))
		var se *SubmitError
		require.True(t, errors.As(err, &se), "%T: %v", err, err)
		assert.Contains(t, se.Msg, "sbatch printed no job id")
		assert.False(t, se.User)
	})

	t.Run("job id with cluster", func(t *testing.T) {
		f := newFakeSlurm(t)
		f.touch("sbatch.stdout", "42;cluster1\n")
		res, err := f.slurm().Run(runCtx(t, 20*time.Second), f.job(&syncBuffer{}, "true"))
		require.NoError(t, err)
		assert.Equal(t, "42", res.JobID)
	})

	t.Run("no sbatch installed", func(t *testing.T) {
		f := newFakeSlurm(t)
		require.NoError(t, os.Remove(filepath.Join(f.bin, "sbatch")))
		_, err := f.slurm().Run(runCtx(t, 20*time.Second), f.job(&syncBuffer{}, "true"))
		var se *SubmitError
		require.True(t, errors.As(err, &se), "%T: %v", err, err)
		assert.False(t, se.User, "a missing sbatch is not the user's fault: %v", se)
	})

	t.Run("script cannot be written", func(t *testing.T) {
		f := newFakeSlurm(t)
		j := f.job(&syncBuffer{}, "true")
		j.Script = filepath.Join(f.work, "missing-dir", "s.sh")
		_, err := f.slurm().Run(runCtx(t, 20*time.Second), j)
		require.Error(t, err)
		assert.Contains(t, err.Error(), "write the batch script")
		assert.Nil(t, f.lines("sbatch.args"))
	})
}

func TestRunCancelled(t *testing.T) {
	f := newFakeSlurm(t)
	var out syncBuffer
	j := f.job(&out, "/bin/sh", "-c", "echo started; exec sleep 30")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	type ret struct {
		res Result
		err error
	}
	done := make(chan ret, 1)
	go func() {
		res, err := f.slurm().Run(ctx, j)
		done <- ret{res, err}
	}()
	require.Eventually(t, func() bool { return out.String() == "started\n" }, 10*time.Second, 10*time.Millisecond)
	cancel()
	var r ret
	select {
	case r = <-done:
	case <-time.After(15 * time.Second):
		t.Fatal("Run did not return after the context was cancelled")
	}
	require.NoError(t, r.err)
	assert.True(t, r.res.Stopped)
	assert.Equal(t, "CANCELLED", r.res.State)
	assert.Equal(t, "42", r.res.JobID)
	assert.False(t, r.res.Marker, "the killed script wrote no marker")
	assert.Equal(t, []string{"42"}, f.lines("scancel.calls"))
	assert.Equal(t, "started\n", out.String())
	assert.Contains(t, f.logs.String(), "Cancelling Slurm job 42 (scancel).")
}

func TestRunCancelledKillAfterGrace(t *testing.T) {
	f := newFakeSlurm(t)
	f.touch("scancel.ignore", "")
	var out syncBuffer
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := f.slurm()
	s.Grace = 100 * time.Millisecond
	done := make(chan Result, 1)
	go func() {
		res, err := s.Run(ctx, f.job(&out, "/bin/sh", "-c", "echo started; exec sleep 30"))
		assert.NoError(t, err)
		done <- res
	}()
	require.Eventually(t, func() bool { return out.String() == "started\n" }, 10*time.Second, 10*time.Millisecond)
	cancel()
	var res Result
	select {
	case res = <-done:
	case <-time.After(15 * time.Second):
		t.Fatal("Run did not return")
	}
	assert.True(t, res.Stopped)
	assert.Equal(t, "CANCELLED", res.State)
	assert.Equal(t, []string{"42", "--signal=KILL --full 42"}, f.lines("scancel.calls"))
	assert.Contains(t, f.logs.String(), "did not end within 100ms: sending SIGKILL")
}

// A controller that cannot be asked must not pass for a job that ended:
// the job still gets its SIGKILL after the grace period.
func TestRunCancelledScontrolDownStillKills(t *testing.T) {
	f := newFakeSlurm(t)
	f.touch("scancel.ignore", "")
	var out syncBuffer
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := f.slurm()
	s.Grace = 100 * time.Millisecond
	s.killWait = 100 * time.Millisecond
	done := make(chan Result, 1)
	go func() {
		res, _ := s.Run(ctx, f.job(&out, "/bin/sh", "-c", "echo started; exec sleep 30"))
		done <- res
	}()
	require.Eventually(t, func() bool { return out.String() == "started\n" }, 10*time.Second, 10*time.Millisecond)
	f.touch("scontrol.down", "")
	cancel()
	var res Result
	select {
	case res = <-done:
	case <-time.After(15 * time.Second):
		t.Fatal("Run did not return")
	}
	assert.True(t, res.Stopped)
	assert.True(t, res.Killed)
	assert.Equal(t, []string{"42", "--signal=KILL --full 42"}, f.lines("scancel.calls"))
	assert.Empty(t, res.State, "the end state is unknown")
}

// A job Slurm answers it does not know has ended: no SIGKILL.
func TestRunCancelledJobGone(t *testing.T) {
	f := newFakeSlurm(t)
	var out syncBuffer
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan Result, 1)
	go func() {
		res, _ := f.slurm().Run(ctx, f.job(&out, "/bin/sh", "-c", "echo started; exec sleep 30"))
		done <- res
	}()
	require.Eventually(t, func() bool { return out.String() == "started\n" }, 10*time.Second, 10*time.Millisecond)
	f.touch("scontrol.fail", "")
	cancel()
	res := <-done
	assert.Equal(t, "GONE", res.State)
	assert.False(t, res.Killed)
	assert.Equal(t, []string{"42"}, f.lines("scancel.calls"))
}

// Cancelling the stage while sbatch hangs stops sbatch at once, and any
// job it may have queued is cancelled by its name and user.
func TestRunCancelledDuringSubmit(t *testing.T) {
	f := newFakeSlurm(t)
	f.touch("sbatch.block", "")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := f.slurm()
	s.User = "ciuser"
	type ret struct {
		res Result
		err error
	}
	done := make(chan ret, 1)
	go func() {
		res, err := s.Run(ctx, f.job(&syncBuffer{}, "true"))
		done <- ret{res, err}
	}()
	require.Eventually(t, func() bool { _, err := os.Stat(filepath.Join(f.bin, "sbatch.pid")); return err == nil },
		10*time.Second, 5*time.Millisecond, "sbatch is running")
	cancel()
	var r ret
	select {
	case r = <-done:
	case <-time.After(15 * time.Second):
		t.Fatal("Run did not return while sbatch hung: the stage's context does not reach sbatch")
	}
	require.NoError(t, r.err)
	assert.True(t, r.res.Stopped)
	assert.Empty(t, r.res.JobID)
	assert.Equal(t, []string{"--name=ci-7-build_script --user=ciuser"}, f.lines("scancel.calls"))
	b, err := os.ReadFile(filepath.Join(f.bin, "sbatch.pid"))
	require.NoError(t, err)
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	require.NoError(t, err)
	assert.True(t, dead(pid), "sbatch was stopped")
}

// sbatch reads SBATCH_* and SLURM_CLUSTERS as options and SLURM_CONF as
// its controller: none may come from the job's environment, and the
// controller is the one scontrol and scancel ask.
func TestRunSbatchEnvironment(t *testing.T) {
	f := newFakeSlurm(t)
	s := f.slurm()
	s.Env = []string{"PATH=/usr/bin:/bin", "SLURM_CONF=/etc/slurm/ci.conf"}
	j := f.job(&syncBuffer{}, "true")
	j.Env = []string{"PATH=/usr/bin:/bin", "KEEP=1", "SBATCH_ARRAY_INX=1-3", "SBATCH_WAIT=1", "SLURM_CLUSTERS=other",
		"SBATCH_CLUSTERS=other", "SLURM_CONF=/home/u/other.conf", "SLURM_JOB_ID=9"}
	_, err := s.Run(runCtx(t, 20*time.Second), j)
	require.NoError(t, err)
	env := f.lines("sbatch.env")
	assert.Contains(t, env, "KEEP=1")
	assert.Contains(t, env, "SLURM_CONF=/etc/slurm/ci.conf")
	for _, kv := range env {
		if strings.HasPrefix(kv, "SBATCH_") || strings.HasPrefix(kv, "SLURM_") {
			assert.Equal(t, "SLURM_CONF=/etc/slurm/ci.conf", kv)
		}
	}
}

func TestRunCancelledWhilePending(t *testing.T) {
	f := newFakeSlurm(t)
	f.touch("hold", "")
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	res, err := f.slurm().Run(ctx, f.job(&syncBuffer{}, "true"))
	require.NoError(t, err)
	assert.True(t, res.Stopped)
	assert.Equal(t, "CANCELLED", res.State)
	assert.Equal(t, []string{"42"}, f.lines("scancel.calls"))
}

func TestRunPendingLimit(t *testing.T) {
	f := newFakeSlurm(t)
	f.touch("hold", "")
	s := f.slurm()
	s.PendingLimit = 150 * time.Millisecond
	res, err := s.Run(runCtx(t, 20*time.Second), f.job(&syncBuffer{}, "true"))
	require.ErrorIs(t, err, ErrPendingLimit)
	assert.Equal(t, "JobHeldUser", res.PendingReason)
	assert.Equal(t, "CANCELLED", res.State)
	assert.Equal(t, "42", res.JobID)
	assert.False(t, res.Stopped)
	assert.Equal(t, []string{"42"}, f.lines("scancel.calls"))
}

func TestRunNoPendingLimit(t *testing.T) {
	f := newFakeSlurm(t)
	f.touch("hold", "")
	ctx, cancel := context.WithTimeout(context.Background(), 400*time.Millisecond)
	defer cancel()
	res, err := f.slurm().Run(ctx, f.job(&syncBuffer{}, "true"))
	require.NoError(t, err, "PendingLimit 0 means no limit")
	assert.True(t, res.Stopped)
	assert.Empty(t, res.PendingReason)
}

func TestRunVanished(t *testing.T) {
	f := newFakeSlurm(t)
	f.touch("hold", "") // never runs, so no marker
	f.touch("scontrol.fail", "")
	s := f.slurm()
	s.UnknownLimit = 150 * time.Millisecond
	res, err := s.Run(runCtx(t, 20*time.Second), f.job(&syncBuffer{}, "true"))
	require.ErrorIs(t, err, ErrVanished)
	assert.Contains(t, err.Error(), "Slurm has not known job 42 for 150ms")
	assert.Contains(t, err.Error(), "Invalid job id specified")
	assert.Equal(t, "VANISHED", res.State)
	assert.False(t, res.Marker)
	assert.Equal(t, []string{"42"}, f.lines("scancel.calls"), "a job Slurm lost sight of is cancelled, in case it still exists")
	assert.Contains(t, f.logs.String(), "cancelling it (scancel)")
}

func TestRunUnknownToScontrolButMarker(t *testing.T) {
	// The job ended and Slurm already forgot it (MinJobAge passed): the
	// marker decides.
	for _, rc := range []int{0, 3} {
		t.Run(strconv.Itoa(rc), func(t *testing.T) {
			f := newFakeSlurm(t)
			f.touch("scontrol.fail", "")
			s := f.slurm()
			s.UnknownLimit = 10 * time.Second
			var out syncBuffer
			res, err := s.Run(runCtx(t, 20*time.Second), f.job(&out, "/bin/sh", "-c", "echo bye; exit "+strconv.Itoa(rc)))
			require.NoError(t, err)
			want := Result{JobID: "42", State: "COMPLETED", ExitCode: rc, Marker: true}
			if rc != 0 {
				want.State = "FAILED"
			}
			assert.Equal(t, want, res)
			assert.Equal(t, "bye\n", out.String())
		})
	}
}

func TestRunFinalWithoutMarker(t *testing.T) {
	// The job ended (say, TIMEOUT) before the script wrote its marker: the
	// state and exit code come from scontrol, and the output is flushed.
	f := newFakeSlurm(t)
	f.touch("hold", "")
	f.touch("state", "JobId=42 JobState=TIMEOUT Reason=TimeLimit ExitCode=0:15\n")
	var out syncBuffer
	j := f.job(&out, "true")
	// Run removes a stale output file first, so write it once sbatch ran.
	require.NoError(t, os.WriteFile(filepath.Join(f.bin, "sbatch"), []byte(strings.Replace(fakeSbatch,
		`if [ -f "$d/sbatch.stdout" ]`, `printf 'working\nkilled mid-li' > "$out"; if [ -f "$d/sbatch.stdout" ]`, 1)), 0o755))
	res, err := f.slurm().Run(runCtx(t, 20*time.Second), j)
	require.NoError(t, err)
	assert.Equal(t, Result{JobID: "42", State: "TIMEOUT", ExitCode: 0, Signal: 15}, res)
	assert.Equal(t, "working\nkilled mid-li\n", out.String())
}

func TestRunPendingSaysWhy(t *testing.T) {
	f := newFakeSlurm(t)
	f.touch("hold", "")
	s := f.slurm()
	s.pendingFirst, s.pendingEvery = 50*time.Millisecond, 100*time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), 600*time.Millisecond)
	defer cancel()
	res, err := s.Run(ctx, f.job(&syncBuffer{}, "true"))
	require.NoError(t, err)
	assert.True(t, res.Stopped)
	lines := regexp.MustCompile(`Slurm job 42 is PENDING for [0-9]+s \(reason: JobHeldUser\)\.`).FindAllString(f.logs.String(), -1)
	assert.GreaterOrEqual(t, len(lines), 3, "a pending job is reported again and again: %s", f.logs.String())
	assert.LessOrEqual(t, len(lines), 7, "but not at every poll: %s", f.logs.String())
}

func TestSubmitRetriesWhileTheControllerIsDown(t *testing.T) {
	f := newFakeSlurm(t)
	f.touch("sbatch.failonce", "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)\n")
	s := f.slurm()
	s.SubmitAttempts, s.retryDelay = 3, 10*time.Millisecond
	res, err := s.Run(runCtx(t, 20*time.Second), f.job(&syncBuffer{}, "true"))
	require.NoError(t, err)
	assert.Equal(t, "COMPLETED", res.State)
	assert.Len(t, f.lines("sbatch.count"), 2)
	assert.Contains(t, f.logs.String(), "Slurm's controller cannot be reached (sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)); submitting again in 10ms.")
}

func TestSubmitGivesUp(t *testing.T) {
	for name, c := range map[string]struct {
		stderr   string
		attempts int
		user     bool
		suffix   string
	}{
		"controller down": {"sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)", 3, false, " (3 attempts)"},
		"refused request": {"sbatch: error: Batch job submission failed: Invalid partition name specified", 1, true, ""},
	} {
		t.Run(name, func(t *testing.T) {
			f := newFakeSlurm(t)
			f.touch("sbatch.stderr", c.stderr+"\n")
			s := f.slurm()
			s.SubmitAttempts, s.retryDelay = 3, 10*time.Millisecond
			_, err := s.Run(runCtx(t, 20*time.Second), f.job(&syncBuffer{}, "true"))
			var se *SubmitError
			require.ErrorAs(t, err, &se)
			assert.Equal(t, c.user, se.User)
			assert.Equal(t, c.stderr+c.suffix, se.Msg)
			assert.Len(t, f.lines("sbatch.count"), c.attempts, "a refused request is not retried")
		})
	}
}
