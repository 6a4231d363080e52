package batch

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/outcome"
)

func TestBatchScriptGolden(t *testing.T) {
	got := BatchScript([]string{"/usr/bin/env", "hello world", "it's"}, "0123abcd", "ci-7-build_script", "/s/build's.sbatch.started", Reaper{})
	want := `#!/bin/sh
# ci-exec batch script for ci-7-build_script
'/usr/bin/env' \
  'hello world' \
  'it'\''s' </dev/null 3>'/s/build'\''s.sbatch.started'
rc=$?
started=0
[ -s '/s/build'\''s.sbatch.started' ] && started=1
printf '\n__CI_EXEC_BATCH_END__ 0123abcd rc=%d started=%d\n' "$rc" "$started"
exit "$rc"
`
	assert.Equal(t, want, got)

	one := BatchScript([]string{"true"}, "n", "j", "f", Reaper{})
	assert.Equal(t, "#!/bin/sh\n# ci-exec batch script for j\n'true' </dev/null 3>'f'\nrc=$?\nstarted=0\n[ -s 'f' ] && started=1\n"+
		"printf '\\n__CI_EXEC_BATCH_END__ n rc=%d started=%d\\n' \"$rc\" \"$started\"\nexit \"$rc\"\n", one)
}

func TestShellQuote(t *testing.T) {
	tests := map[string]string{
		"":       "''",
		"a":      "'a'",
		"a b":    "'a b'",
		"'":      `''\'''`,
		"a'b'c":  `'a'\''b'\''c'`,
		`$x"\`:   `'$x"\'`,
		"line\n": "'line\n'",
	}
	for in, want := range tests {
		assert.Equal(t, want, shellQuote(in), "%q", in)
	}
}

// runScript writes BatchScript(argv) to a fresh directory and runs it with
// /bin/sh there (stdin holds "secret stdin"); it returns stdout and the exit
// code and fails when the directory holds anything but the script afterwards.
func runScript(t *testing.T, argv []string, nonce string) (string, int) {
	t.Helper()
	dir := t.TempDir()
	script := filepath.Join(dir, "job.sh")
	require.NoError(t, os.WriteFile(script, []byte(BatchScript(argv, nonce, "ci-1-test", filepath.Join(dir, "job.sh.started"), Reaper{})), 0o700))
	cmd := exec.Command("/bin/sh", script)
	cmd.Dir = dir
	cmd.Stdin = strings.NewReader("secret stdin\n")
	var stdout bytes.Buffer
	cmd.Stdout = &stdout
	err := cmd.Run()
	rc := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		rc = ee.ExitCode()
	} else {
		require.NoError(t, err)
	}
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	assert.Equal(t, []string{"job.sh", "job.sh.started"}, names, "the script creates no file but its start file (no word may be interpreted)")
	return stdout.String(), rc
}

func marker(nonce string, rc int) string {
	return "\n" + markerPrefix + " " + nonce + " rc=" + strconv.Itoa(rc) + " started=0\n"
}

func TestBatchScriptRunsArgvVerbatim(t *testing.T) {
	words := []string{
		"plain",
		"two words",
		"it's",
		`say "hi"`,
		`'both' "kinds"`,
		"$(touch pwned)",
		"`touch pwned2`",
		"$HOME ${PATH} $1 $@ $#",
		"a\nb\n",
		"\n",
		"",
		"-n",
		"-e",
		"--",
		"*",
		"~",
		`back\slash \\ \n \'`,
		"tab\there",
		"; touch pwned3; #",
		"| cat > pwned4",
		"'",
		`\`,
		"ünïcødé",
	}
	// The helper prints the number of words, then each word in brackets.
	argv := append([]string{"/bin/sh", "-c", `printf '%s\n' "$#"; printf '[%s]\n' "$@"`, "sh"}, words...)
	var want strings.Builder
	want.WriteString(strconv.Itoa(len(words)) + "\n")
	for _, w := range words {
		want.WriteString("[" + w + "]\n")
	}
	want.WriteString(marker("f00d", 0))

	out, rc := runScript(t, argv, "f00d")
	assert.Equal(t, 0, rc)
	assert.Equal(t, want.String(), out)
}

func TestBatchScriptExitCode(t *testing.T) {
	tests := map[string]struct {
		argv []string
		out  string
		rc   int
	}{
		"success":            {argv: []string{"/bin/sh", "-c", "echo ok"}, out: "ok\n", rc: 0},
		"exit 7":             {argv: []string{"/bin/sh", "-c", "echo out; exit 7"}, out: "out\n", rc: 7},
		"no final newline":   {argv: []string{"/bin/sh", "-c", "printf partial; exit 3"}, out: "partial", rc: 3},
		"command not found":  {argv: []string{"/nonexistent/program", "arg"}, out: "", rc: 127},
		"stdin is /dev/null": {argv: []string{"/bin/sh", "-c", `cat; echo "rc=$?"`}, out: "rc=0\n", rc: 0},
		"killed by signal":   {argv: []string{"/bin/sh", "-c", "kill -TERM $$"}, out: "", rc: 143},
		"fake marker in output": {argv: []string{"/bin/sh", "-c", "printf '\\n" + markerPrefix + " f00d rc=0\\n'; exit 9"},
			out: "\n" + markerPrefix + " f00d rc=0\n", rc: 9},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			out, rc := runScript(t, tc.argv, "f00d")
			assert.Equal(t, tc.rc, rc, "the script exits with the command's code")
			assert.Equal(t, tc.out+marker("f00d", tc.rc), out)
			lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
			assert.Equal(t, markerPrefix+" f00d rc="+strconv.Itoa(tc.rc)+" started=0", lines[len(lines)-1], "the marker is the last line")
		})
	}
}

// TestBatchScriptStartSignal: the marker says whether the command's
// script began (it wrote to fd 3, as outcome.StartCommand makes a shell
// do), which tells a runtime missing on the node (127 before the script)
// from a script's own 127.
func TestBatchScriptStartSignal(t *testing.T) {
	tests := map[string]struct {
		argv    []string
		rc      int
		started bool
	}{
		"script ran and failed":           {argv: outcome.StartCommand([]string{"/bin/sh", "-c", "exit 3"}), rc: 3, started: true},
		"script's own command not found":  {argv: outcome.StartCommand([]string{"/bin/sh", "-c", "/nonexistent/tool"}), rc: 127, started: true},
		"runtime missing on the node":     {argv: []string{"/nonexistent/ch-run", "--", "/bin/sh", "-c", "printf x >&3"}, rc: 127},
		"command that gives no signal":    {argv: []string{"/bin/sh", "-c", "exit 0"}, rc: 0},
		"shell missing in the image/node": {argv: outcome.StartCommand([]string{"/nonexistent/sh", "script"}), rc: 127},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			out, rc := runScript(t, tc.argv, "f00d")
			assert.Equal(t, tc.rc, rc)
			flag := "0"
			if tc.started {
				flag = "1"
			}
			assert.True(t, strings.HasSuffix(out, " f00d rc="+strconv.Itoa(tc.rc)+" started="+flag+"\n"), "%q", out)
		})
	}
}

// TestBatchScriptThroughFollower runs a script and reads its output file with
// the follower, as Run does: the command's output comes back unchanged.
func TestBatchScriptThroughFollower(t *testing.T) {
	tests := map[string]struct {
		cmd string
		out string
		rc  int
	}{
		"lines":                  {cmd: "echo a; echo b; exit 4", out: "a\nb\n", rc: 4},
		"trailing empty line":    {cmd: "echo a; echo", out: "a\n\n", rc: 0},
		"no final newline":       {cmd: "printf a", out: "a\n", rc: 0},
		"nothing":                {cmd: "exit 2", out: "", rc: 2},
		"empty lines in between": {cmd: "printf 'a\\n\\n\\nb\\n'", out: "a\n\n\nb\n", rc: 0},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			out, rc := runScript(t, []string{"/bin/sh", "-c", tc.cmd}, "beef")
			require.Equal(t, tc.rc, rc)
			path := filepath.Join(t.TempDir(), "out")
			require.NoError(t, os.WriteFile(path, []byte(out), 0o600))
			var buf bytes.Buffer
			f := &follower{path: path, out: &buf, marker: markerPrefix + " beef rc="}
			f.poll()
			assert.True(t, f.done)
			assert.Equal(t, tc.rc, f.rc)
			assert.Equal(t, tc.out, buf.String())
		})
	}
}

// slurm22 is a `scontrol show job -o` line of Slurm 22.05.
func slurm22(state, reason, exit string) string {
	return "JobId=42 JobName=ci-1001-build_script UserId=ci(1001) GroupId=ci(1001) MCS_label=N/A " +
		"Priority=4294901758 Nice=0 Account=(null) QOS=normal JobState=" + state + " Reason=" + reason +
		" Dependency=(null) Requeue=0 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=" + exit +
		" RunTime=00:00:03 TimeLimit=01:00:00 TimeMin=N/A SubmitTime=2024-05-02T10:00:00 EligibleTime=2024-05-02T10:00:00" +
		" AccrueTime=2024-05-02T10:00:00 StartTime=2024-05-02T10:00:01 EndTime=2024-05-02T11:00:01 Deadline=N/A" +
		" SuspendTime=None SecsPreSuspend=0 LastSchedEval=2024-05-02T10:00:01 Scheduler=Main Partition=debug" +
		" AllocNode:Sid=login1:4242 ReqNodeList=(null) ExcNodeList=(null) NodeList=node1 BatchHost=node1" +
		" NumNodes=1 NumCPUs=1 NumTasks=1 CPUs/Task=1 ReqB:S:C:T=0:0:*:* TRES=cpu=1,mem=1G,node=1,billing=1" +
		" Socks/Node=* NtasksPerN:B:S:C=0:0:*:* CoreSpec=* MinCPUsNode=1 MinMemoryNode=1G MinTmpDiskNode=0" +
		" Features=(null) DelayBoot=00:00:00 OverSubscribe=OK Contiguous=0 Licenses=(null) Network=(null)" +
		" Command=/home/ci/builds/0/p/script.sh WorkDir=/home/ci/builds/0/p StdErr=/home/ci/builds/0/p/out" +
		" StdIn=/dev/null StdOut=/home/ci/builds/0/p/out Power=\n"
}

func TestParseJob(t *testing.T) {
	tests := map[string]struct {
		line string
		want jobState
	}{
		"pending, held":     {line: slurm22("PENDING", "JobHeldUser", "0:0"), want: jobState{State: "PENDING", Reason: "JobHeldUser"}},
		"pending, priority": {line: slurm22("PENDING", "Priority", "0:0"), want: jobState{State: "PENDING", Reason: "Priority"}},
		"pending, nodes unavailable": {line: slurm22("PENDING", "ReqNodeNotAvail,_UnavailableNodes:node[1-2]", "0:0"),
			want: jobState{State: "PENDING", Reason: "ReqNodeNotAvail,_UnavailableNodes:node[1-2]"}},
		"running":    {line: slurm22("RUNNING", "None", "0:0"), want: jobState{State: "RUNNING", Reason: "None"}},
		"completing": {line: slurm22("COMPLETING", "None", "0:0"), want: jobState{State: "COMPLETING", Reason: "None"}},
		"completed":  {line: slurm22("COMPLETED", "None", "0:0"), want: jobState{State: "COMPLETED", Reason: "None"}},
		"failed":     {line: slurm22("FAILED", "NonZeroExitCode", "7:0"), want: jobState{State: "FAILED", Reason: "NonZeroExitCode", ExitCode: 7}},
		"cancelled":  {line: slurm22("CANCELLED", "None", "0:15"), want: jobState{State: "CANCELLED", Reason: "None", Signal: 15}},
		"timeout":    {line: slurm22("TIMEOUT", "TimeLimit", "0:0"), want: jobState{State: "TIMEOUT", Reason: "TimeLimit"}},
		"oom":        {line: slurm22("OUT_OF_MEMORY", "OutOfMemory", "0:125"), want: jobState{State: "OUT_OF_MEMORY", Reason: "OutOfMemory", Signal: 125}},
		"multi-line (no -o)": {line: "JobId=42 JobName=x\n   UserId=ci(1001)\n   JobState=FAILED Reason=NonZeroExitCode Dependency=(null)\n   Requeue=0 ExitCode=2:0\n",
			want: jobState{State: "FAILED", Reason: "NonZeroExitCode", ExitCode: 2}},
		"DerivedExitCode is not ExitCode": {line: "JobId=42 JobState=FAILED Reason=None DerivedExitCode=9:0 ExitCode=3:0",
			want: jobState{State: "FAILED", Reason: "None", ExitCode: 3}},
		"a comment later on the line cannot fake the state": {
			line: strings.TrimSuffix(slurm22("RUNNING", "None", "0:0"), "\n") + " Comment=JobState=COMPLETED_Reason=x_ExitCode=5:0",
			want: jobState{State: "RUNNING", Reason: "None"}},
		"no reason, no exit code": {line: "JobId=42 JobState=RUNNING", want: jobState{State: "RUNNING"}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got, err := ParseJob(tc.line)
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}

	for _, bad := range []string{"", "slurm_load_jobs error: Invalid job id specified\n", "JobId=42 JobName=x State=RUNNING", "JobState="} {
		_, err := ParseJob(bad)
		assert.Error(t, err, "%q", bad)
	}
	_, err := ParseJob("slurm_load_jobs error: Invalid job id specified\n")
	assert.EqualError(t, err, `no JobState in "slurm_load_jobs error: Invalid job id specified"`)
}

func TestIsFinal(t *testing.T) {
	final := []string{"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
	notFinal := []string{"PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
		"REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "SPECIAL_EXIT", "RESV_DEL_HOLD", "", "completed", "VANISHED"}
	for _, s := range final {
		assert.True(t, isFinal(s), s)
	}
	for _, s := range notFinal {
		assert.False(t, isFinal(s), s)
	}
}

func TestClassifySubmit(t *testing.T) {
	tests := map[string]struct {
		stderr string
		msg    string
		user   bool
	}{
		"invalid partition": {stderr: "sbatch: error: Batch job submission failed: Invalid partition name specified",
			msg: "sbatch: error: Batch job submission failed: Invalid partition name specified", user: true},
		"impossible resources": {stderr: "sbatch: error: Batch job submission failed: Requested node configuration is not available",
			msg: "sbatch: error: Batch job submission failed: Requested node configuration is not available", user: true},
		"invalid account": {stderr: "sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified",
			msg: "sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified", user: true},
		"controller down": {stderr: "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)",
			msg: "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)"},
		"socket timeout": {stderr: "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation",
			msg: "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation"},
		"no sbatch": {stderr: "fork/exec /usr/bin/sbatch: no such file or directory",
			msg: "fork/exec /usr/bin/sbatch: no such file or directory"},
		"multi-line, user error last": {
			stderr: "sbatch: warning: can't honor --ntasks-per-node set to 4 which doesn't match the requested tasks 2\nsbatch: error: Batch job submission failed: Invalid qos specification",
			msg:    "sbatch: error: Batch job submission failed: Invalid qos specification", user: true},
		"multi-line, controller down last": {
			stderr: "sbatch: error: slurm_persist_conn_open_without_init: failed to open persistent connection\nsbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)",
			msg:    "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			err := classifySubmit(tc.stderr)
			var se *SubmitError
			require.True(t, errors.As(err, &se), "%T", err)
			assert.Equal(t, tc.msg, se.Msg)
			assert.Equal(t, tc.msg, err.Error())
			assert.Equal(t, tc.user, se.User)
		})
	}
}

func TestClassifySubmitVerdictIsLastLine(t *testing.T) {
	// sbatch retried after a transient controller problem and then got a
	// definite answer that is the user's to fix.
	stderr := "sbatch: error: slurm_receive_msg: Socket timed out on send/recv operation\n" +
		"sbatch: error: Batch job submission failed: Invalid partition name specified"
	var se *SubmitError
	require.True(t, errors.As(classifySubmit(stderr), &se))
	assert.Equal(t, "sbatch: error: Batch job submission failed: Invalid partition name specified", se.Msg)
	assert.True(t, se.User, "the last line decides")
}

// follow is a follower on a file in a fresh directory.
type follow struct {
	t    *testing.T
	path string
	buf  bytes.Buffer
	f    *follower
}

func newFollow(t *testing.T, nonce string) *follow {
	fl := &follow{t: t, path: filepath.Join(t.TempDir(), "job.out")}
	fl.f = &follower{path: fl.path, out: &fl.buf, marker: markerPrefix + " " + nonce + " rc="}
	return fl
}

func (fl *follow) write(s string) *follow {
	fh, err := os.OpenFile(fl.path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	require.NoError(fl.t, err)
	_, err = fh.WriteString(s)
	require.NoError(fl.t, err)
	require.NoError(fl.t, fh.Close())
	return fl
}

// step writes s, polls and checks the output so far.
func (fl *follow) step(s, want string) {
	fl.t.Helper()
	fl.write(s)
	fl.f.poll()
	assert.Equal(fl.t, want, fl.buf.String(), "after writing %q", s)
}

func TestFollower(t *testing.T) {
	mark := func(rc int) string { return markerPrefix + " n1 rc=" + strconv.Itoa(rc) + "\n" }

	t.Run("file does not exist yet", func(t *testing.T) {
		fl := newFollow(t, "n1")
		fl.f.poll()
		fl.f.poll()
		assert.Empty(t, fl.buf.String())
		assert.False(t, fl.f.done)
		fl.step("hello\n", "hello\n")
	})

	t.Run("partial lines are copied as they arrive", func(t *testing.T) {
		fl := newFollow(t, "n1")
		fl.step("one\ntw", "one\ntw")
		fl.step("o", "one\ntwo")
		fl.step("", "one\ntwo")
		fl.step("\nthree", "one\ntwo\nthree")
		fl.step("\n", "one\ntwo\nthree\n")
		assert.False(t, fl.f.done)
	})

	t.Run("a partial line that may become the marker is held", func(t *testing.T) {
		fl := newFollow(t, "n1")
		fl.step("a\n__CI_EXEC_BATCH", "a\n")
		fl.step("_END__ n1 rc=0 st", "a\n")
		fl.step("arted=", "a\n")
		fl.step("x\n", "a\n"+markerPrefix+" n1 rc=0 started=x\n")
		fl.step("__CI_EXEC_BATCH_END__ n2", "a\n"+markerPrefix+" n1 rc=0 started=x\n__CI_EXEC_BATCH_END__ n2")
		fl.step(" more\n", "a\n"+markerPrefix+" n1 rc=0 started=x\n__CI_EXEC_BATCH_END__ n2 more\n")
		assert.False(t, fl.f.done)
		fl.step(markerPrefix+" n1 rc="+strings.Repeat("1", 40), "a\n"+markerPrefix+" n1 rc=0 started=x\n__CI_EXEC_BATCH_END__ n2 more\n"+
			markerPrefix+" n1 rc="+strings.Repeat("1", 40))
	})

	t.Run("the marker's start signal", func(t *testing.T) {
		for line, want := range map[string]bool{" n1 rc=3 started=1\n": true, " n1 rc=3 started=0\n": false, " n1 rc=3\n": false} {
			fl := newFollow(t, "n1")
			fl.step("\n"+markerPrefix+line, "")
			assert.True(t, fl.f.done, line)
			assert.Equal(t, 3, fl.f.rc)
			assert.Equal(t, want, fl.f.started, line)
		}
	})

	t.Run("a long line without a newline passes through a bounded buffer", func(t *testing.T) {
		fl := newFollow(t, "n1")
		var out countingWriter
		fl.f.out = &out
		line := strings.Repeat("x", 1<<20)
		for range 20 {
			fl.write(line)
			fl.f.poll()
		}
		assert.Equal(t, int64(20<<20), out.n, "every byte is copied while the line is still open")
		assert.LessOrEqual(t, cap(fl.f.part), 2*len(fl.f.marker)+markerHold, "nothing of it is held")
		assert.LessOrEqual(t, out.maxWrite, readChunk, "it is copied in pieces")
		fl.write("\n" + mark(0))
		fl.f.poll()
		assert.True(t, fl.f.done)
		assert.Equal(t, int64(20<<20+1), out.n, "the line's end, and not the marker")
	})

	t.Run("marker not copied, sets done and rc", func(t *testing.T) {
		fl := newFollow(t, "n1")
		fl.step("out\n", "out\n")
		fl.step("\n"+mark(7), "out\n")
		assert.True(t, fl.f.done)
		assert.Equal(t, 7, fl.f.rc)
	})

	t.Run("marker arriving in pieces", func(t *testing.T) {
		fl := newFollow(t, "n1")
		fl.step("out\n\n__CI_EXEC", "out\n")
		fl.step("_BATCH_END__ n1 rc=", "out\n")
		assert.False(t, fl.f.done)
		fl.step("12\n", "out\n")
		assert.True(t, fl.f.done)
		assert.Equal(t, 12, fl.f.rc)
	})

	t.Run("empty line before the marker dropped, in the middle kept", func(t *testing.T) {
		fl := newFollow(t, "n1")
		fl.step("a\n\n", "a\n")
		fl.step("b\n", "a\n\nb\n")
		fl.step("\n\n", "a\n\nb\n\n")
		fl.step("\n"+mark(0), "a\n\nb\n\n\n")
		assert.True(t, fl.f.done)
		assert.Equal(t, 0, fl.f.rc)
	})

	t.Run("output after the marker is not copied", func(t *testing.T) {
		fl := newFollow(t, "n1")
		fl.step("a\n\n"+mark(3)+"after\n", "a\n")
		fl.step("more\n\n", "a\n")
		fl.f.drain(0)
		assert.Equal(t, "a\n", fl.buf.String())
		assert.Equal(t, 3, fl.f.rc)
	})

	t.Run("a marker with another nonce is output", func(t *testing.T) {
		fl := newFollow(t, "n1")
		fake := markerPrefix + " n2 rc=0\n"
		fl.step("\n"+fake, "\n"+fake)
		assert.False(t, fl.f.done)
		fl.step(markerPrefix+" n1 rc=zero\n", "\n"+fake+markerPrefix+" n1 rc=zero\n")
		fl.step(markerPrefix+" n1 rc=1 x\n", "\n"+fake+markerPrefix+" n1 rc=zero\n"+markerPrefix+" n1 rc=1 x\n")
		fl.step(" "+mark(0), "\n"+fake+markerPrefix+" n1 rc=zero\n"+markerPrefix+" n1 rc=1 x\n"+" "+mark(0))
		assert.False(t, fl.f.done)
		fl.step(mark(5), "\n"+fake+markerPrefix+" n1 rc=zero\n"+markerPrefix+" n1 rc=1 x\n"+" "+mark(0))
		assert.True(t, fl.f.done)
		assert.Equal(t, 5, fl.f.rc)
	})

	t.Run("drain flushes a final partial line without a marker", func(t *testing.T) {
		fl := newFollow(t, "n1")
		fl.step("a\n__CI_EXEC", "a\n")
		fl.f.drain(0)
		assert.Equal(t, "a\n__CI_EXEC\n", fl.buf.String())
		assert.False(t, fl.f.done)
	})

	t.Run("drain ends a copied partial line", func(t *testing.T) {
		fl := newFollow(t, "n1")
		fl.step("a\nno newline", "a\nno newline")
		fl.f.drain(0)
		assert.Equal(t, "a\nno newline\n", fl.buf.String())
		assert.False(t, fl.f.done)
		fl.f.drain(0)
		assert.Equal(t, "a\nno newline\n", fl.buf.String(), "flushed once")
	})

	t.Run("drain flushes a held empty line without a marker", func(t *testing.T) {
		fl := newFollow(t, "n1")
		fl.step("a\n\n", "a\n")
		fl.f.drain(0)
		assert.Equal(t, "a\n\n", fl.buf.String())
	})

	t.Run("drain reads until the marker", func(t *testing.T) {
		fl := newFollow(t, "n1")
		fl.write("a\n")
		fl.f.poll()
		late := time.AfterFunc(150*time.Millisecond, func() {
			// The node's last writes reach the file late.
			fh, err := os.OpenFile(fl.path, os.O_WRONLY|os.O_APPEND, 0)
			if err == nil {
				_, _ = fh.WriteString("b\n\n" + mark(2))
				_ = fh.Close()
			}
		})
		defer late.Stop()
		fl.f.drain(5 * time.Second)
		assert.True(t, fl.f.done)
		assert.Equal(t, 2, fl.f.rc)
		assert.Equal(t, "a\nb\n", fl.buf.String())
	})

	t.Run("drain of a missing file", func(t *testing.T) {
		fl := newFollow(t, "n1")
		fl.f.drain(0)
		assert.Empty(t, fl.buf.String())
		assert.False(t, fl.f.done)
	})
}

// countingWriter counts what is written and the largest single write.
type countingWriter struct {
	n        int64
	maxWrite int
}

func (c *countingWriter) Write(p []byte) (int, error) {
	c.n += int64(len(p))
	c.maxWrite = max(c.maxWrite, len(p))
	return len(p), nil
}
