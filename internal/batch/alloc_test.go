package batch

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestIdentityComment(t *testing.T) {
	id := Identity{JobID: 42, Pipeline: "7", Project: "group/sub proj", Runner: "t0k=n", StateDir: "/data/state dir/r/000/42"}
	c := id.Comment()
	assert.Equal(t, "ci-exec job=42 pipeline=7 project=group/sub_proj runner=t0k_n state=/data/state dir/r/000/42", c)
	got, ok := ParseComment(c)
	require.True(t, ok)
	assert.Equal(t, Identity{JobID: 42, Pipeline: "7", Project: "group/sub_proj", Runner: "t0k_n", StateDir: "/data/state dir/r/000/42"}, got)
	for _, other := range []string{"", "(null)", "ci job", "ci-exec job=x pipeline=1 project=p runner=r state=/s",
		"ci-exec job=1 pipeline=1 project=p runner=r state=relative", "ci-exec job=1 pipeline=1 project=p state=/s",
		"ci-exec job=1 pipeline=1 project=p runner=r other=x state=/s"} {
		_, ok := ParseComment(other)
		assert.False(t, ok, "%q is not ci-exec's", other)
	}
}

func TestSbatchArgsComment(t *testing.T) {
	got := SbatchArgs(SubmitSpec{JobName: "n", Output: "o", Chdir: "d", UserArgs: []string{"--comment=mine"}, Comment: "ci-exec job=1"})
	assert.Equal(t, []string{"--no-requeue", "--export=ALL", "--comment=mine", "--comment=ci-exec job=1", "--job-name=n", "--output=o", "--chdir=d", "--parsable"}, got,
		"ci-exec's comment comes after the user's, so sbatch keeps it")
}

func TestStageScript(t *testing.T) {
	script, skipped := StageScript(StageJob{Name: "ci-1-build_script", Argv: []string{"/bin/echo", "it's"},
		Env: []string{"HOME=/h", "A_B=x y", "BASH_FUNC_f%%=() { :; }", "SLURM_JOB_ID=9"}, Dir: "/w d", Script: "/s/b.sbatch", Output: "/s/b.out"},
		"n0nce", []string{"HOME", "LANG", "SLURM_CONF", "PATH"}, Reaper{})
	assert.Equal(t, `#!/bin/sh
# ci-exec stage script for ci-1-build_script
exec >'/s/b.out' 2>&1 </dev/null
unset 'LANG'
unset 'PATH'
export 'HOME=/h'
export 'A_B=x y'
if cd '/w d'; then
'/bin/echo' \
  'it'\''s' </dev/null 3>'/s/b.sbatch.started'
rc=$?
started=0
[ -s '/s/b.sbatch.started' ] && started=1
else
  rc=1 started=0
fi
printf '\n__CI_EXEC_BATCH_END__ n0nce rc=%d started=%d\n' "$rc" "$started"
exit "$rc"
`, script)
	assert.Equal(t, []string{"BASH_FUNC_f%%", "SLURM_JOB_ID"}, skipped)
}

// The agent, run by a plain sh (as Slurm would start it): it runs the
// stages handed to it, each once, with the stage's own environment and
// output file, reports each one's status, and exits on release or idle.
func TestAgent(t *testing.T) {
	dir := t.TempDir()
	agent := filepath.Join(dir, "agent.sh")
	require.NoError(t, os.WriteFile(agent, []byte(AgentScript(dir, "ci-1-alloc", time.Hour)), 0o700))
	cmd := exec.Command("/bin/sh", agent)
	cmd.Env = []string{"PATH=/usr/bin:/bin", "LEFTOVER=agent-only", "SLURM_JOB_ID=5"}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	require.NoError(t, cmd.Start())
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	run := func(nonce string, argv []string) string {
		job := StageJob{Name: "s", Argv: argv, Env: []string{"PATH=/usr/bin:/bin", "MINE=stage"}, Dir: dir,
			Script: filepath.Join(dir, nonce+".sbatch"), Output: filepath.Join(dir, nonce+".out")}
		script, _ := StageScript(job, nonce, []string{"PATH", "LEFTOVER"}, Reaper{})
		require.NoError(t, os.WriteFile(filepath.Join(dir, ".next."+nonce+".tmp"), []byte(script), 0o700))
		require.NoError(t, os.Rename(filepath.Join(dir, ".next."+nonce+".tmp"), filepath.Join(dir, "next."+nonce)))
		r := &allocRun{dir: dir, nonce: nonce}
		var rc int
		require.Eventually(t, func() bool {
			var ok bool
			rc, ok = r.ended()
			return ok
		}, 10*time.Second, 10*time.Millisecond)
		b, err := os.ReadFile(job.Output)
		require.NoError(t, err)
		assert.False(t, r.reclaim(), "the agent took the script")
		return string(b) + "rc=" + string(rune('0'+rc))
	}
	got := run("aaa", []string{"/bin/sh", "-c", `echo "mine=$MINE leftover=${LEFTOVER-unset} slurm=$SLURM_JOB_ID"; exit 3`})
	assert.Contains(t, got, "mine=stage leftover=unset slurm=5\n")
	assert.Contains(t, got, "__CI_EXEC_BATCH_END__ aaa rc=3 started=0\nrc=3")
	got = run("bbb", []string{"/bin/echo", "second"})
	assert.Contains(t, got, "second\n\n__CI_EXEC_BATCH_END__ bbb rc=0 started=0\nrc=0")

	require.NoError(t, os.WriteFile(filepath.Join(dir, "release"), nil, 0o600))
	select {
	case err := <-exited:
		require.NoError(t, err, "%s", out.String())
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatal("the agent did not exit on release")
	}
}

func TestAgentIdle(t *testing.T) {
	dir := t.TempDir()
	agent := filepath.Join(dir, "agent.sh")
	require.NoError(t, os.WriteFile(agent, []byte(AgentScript(dir, "ci-1-alloc", 200*time.Millisecond)), 0o700))
	out, err := exec.Command("/bin/sh", agent).CombinedOutput()
	require.NoError(t, err)
	assert.True(t, strings.HasPrefix(string(out), "ci-exec: no stage to run for 200ms (batch.idle_limit): ending the allocation"), "%s", out)
	assert.True(t, (&allocRun{dir: dir}).idle())
	// A stage handed over too late is taken back.
	require.NoError(t, os.WriteFile(filepath.Join(dir, "next.ccc"), nil, 0o700))
	assert.True(t, (&allocRun{dir: dir, nonce: "ccc"}).reclaim())
	assert.NoFileExists(t, filepath.Join(dir, "next.ccc"))
}

// startAgent runs the allocation's agent in dir as Slurm would (here: a
// plain child process), until the test ends.
func startAgent(t *testing.T, dir string) {
	t.Helper()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "agent.sh"), []byte(AgentScript(dir, "ci-7-alloc", time.Hour)), 0o700))
	cmd := exec.Command("/bin/sh", filepath.Join(dir, "agent.sh"))
	cmd.Env = []string{"PATH=/usr/bin:/bin", "SLURM_JOB_ID=42"}
	require.NoError(t, cmd.Start())
	t.Cleanup(func() {
		_ = os.WriteFile(filepath.Join(dir, "release"), nil, 0o600)
		_ = cmd.Wait()
	})
}

func TestRunInAllocation(t *testing.T) {
	f := newFakeSlurm(t) // scontrol: RUNNING
	q := t.TempDir()
	startAgent(t, q)
	a := &Allocation{ID: "42", Name: "ci-7-alloc", Dir: q, Submitted: time.Now(), EnvKeys: []string{"PATH"}}
	out := &syncBuffer{}
	job := StageJob{Name: "ci-7-build_script", Argv: []string{"/bin/sh", "-c", `echo "in $SLURM_JOB_ID"; exit 5`},
		Env: []string{"PATH=/usr/bin:/bin"}, Dir: f.work, Script: filepath.Join(f.work, "b.sbatch"), Output: filepath.Join(f.work, "b.out"), Out: out}
	res, err := f.slurm().RunIn(runCtx(t, 20*time.Second), a, job)
	require.NoError(t, err)
	assert.Equal(t, "in 42\n", out.String(), "the output, without the end marker")
	assert.True(t, res.Marker)
	assert.Equal(t, 5, res.ExitCode)
	assert.Equal(t, "FAILED", res.State)
	assert.Equal(t, "42", res.JobID)
	assert.Empty(t, f.lines("scancel.calls"), "the allocation runs on")

	// The next stage in the same allocation.
	out2 := &syncBuffer{}
	job.Argv, job.Out = []string{"/bin/echo", "second"}, out2
	res, err = f.slurm().RunIn(runCtx(t, 20*time.Second), a, job)
	require.NoError(t, err)
	assert.Equal(t, "second\n", out2.String())
	assert.Equal(t, 0, res.ExitCode)
	assert.Equal(t, "COMPLETED", res.State)
}

func TestRunInScriptWithoutMarker(t *testing.T) {
	f := newFakeSlurm(t)
	q := t.TempDir()
	startAgent(t, q)
	a := &Allocation{ID: "42", Dir: q, Submitted: time.Now()}
	// The stage's output file cannot be opened: the script ends at once,
	// without its marker; the agent's status says so.
	job := StageJob{Name: "s", Argv: []string{"/bin/true"}, Dir: f.work, Script: filepath.Join(f.work, "b.sbatch"),
		Output: filepath.Join(f.work, "no-such-dir", "b.out"), Out: &syncBuffer{}}
	res, err := f.slurm().RunIn(runCtx(t, 20*time.Second), a, job)
	require.NoError(t, err)
	assert.False(t, res.Marker)
	assert.Equal(t, "FAILED", res.State)
	assert.NotZero(t, res.ExitCode)
}

func TestRunInEndedAllocation(t *testing.T) {
	f := newFakeSlurm(t)
	q := t.TempDir()
	// No agent: it has ended after idle_limit.
	f.touch("state", "JobId=42 JobName=x UserId=ci(1000) JobState=COMPLETED Reason=None Dependency=(null) ExitCode=0:0\n")
	require.NoError(t, os.WriteFile(filepath.Join(q, "idle"), nil, 0o600))
	a := &Allocation{ID: "42", Dir: q, Submitted: time.Now()}
	job := StageJob{Name: "s", Argv: []string{"/bin/true"}, Dir: f.work, Script: filepath.Join(f.work, "b.sbatch"),
		Output: filepath.Join(f.work, "b.out"), Out: &syncBuffer{}}
	_, err := f.slurm().RunIn(runCtx(t, 20*time.Second), a, job)
	var ended *AllocationEndedError
	require.ErrorAs(t, err, &ended)
	assert.True(t, ended.Idle)
	assert.Equal(t, "COMPLETED", ended.State)
	left, _ := filepath.Glob(filepath.Join(q, "next.*"))
	assert.Empty(t, left, "the stage took its script back")
}
