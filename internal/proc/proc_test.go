package proc

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func bash(script string) []string { return []string{"/bin/bash", "-c", script} }

// The tests run as a subreaper, as ci-exec does for every stage. The main
// goroutine keeps the main thread to itself, so the tests' goroutines run
// on threads the runtime may end (it never ends the main thread).
func TestMain(m *testing.M) {
	runtime.LockOSThread()
	if err := BecomeSubreaper(); err != nil {
		fmt.Fprintln(os.Stderr, "PR_SET_CHILD_SUBREAPER:", err)
		os.Exit(1)
	}
	os.Exit(m.Run())
}

func TestExitCodes(t *testing.T) {
	for _, code := range []int{0, 1, 3, 137, 255} {
		res, err := Run(context.Background(), Cmd{Argv: bash("exit " + strconv.Itoa(code)), Grace: time.Second})
		require.NoError(t, err)
		assert.Equal(t, code, res.ExitCode)
		assert.False(t, res.Signaled)
	}
	res, err := Run(context.Background(), Cmd{Argv: bash("kill -KILL $$"), Grace: time.Second})
	require.NoError(t, err)
	assert.True(t, res.Signaled)
	assert.Equal(t, 137, res.ExitCode)
}

func TestStartErrors(t *testing.T) {
	_, err := Run(context.Background(), Cmd{Argv: []string{"/nonexistent/prog"}})
	var se *StartError
	require.ErrorAs(t, err, &se)
	_, err = Run(context.Background(), Cmd{Argv: []string{"/bin/true"}, Dir: "/nonexistent/dir"})
	require.ErrorAs(t, err, &se)
	assert.Contains(t, err.Error(), "working directory /nonexistent/dir")
	_, err = Run(context.Background(), Cmd{})
	require.ErrorAs(t, err, &se)
}

func TestEnvIsExactAndStdinIsClosed(t *testing.T) {
	var out bytes.Buffer
	res, err := Run(context.Background(), Cmd{
		Argv:   []string{"/usr/bin/env"},
		Env:    []string{"ONLY=this"},
		Stdout: &out,
	})
	require.NoError(t, err)
	assert.Equal(t, 0, res.ExitCode)
	assert.Equal(t, "ONLY=this\n", out.String())

	out.Reset()
	_, err = Run(context.Background(), Cmd{Argv: bash("cat; echo end"), Stdout: &out})
	require.NoError(t, err)
	assert.Equal(t, "end\n", out.String(), "stdin is /dev/null, never a terminal or the runner's")
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	p, ok := readStat(pid)
	return ok && !p.dead()
}

// pidIn reads the pid a script wrote to path.
func pidIn(t *testing.T, path string) int {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err, "the script writes the pid before it ends")
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	require.NoError(t, err)
	return pid
}

// onLine is a command output that calls f once, when a whole line equal
// to want has been written: the command's own signal that it is ready.
type onLine struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	want string
	f    func()
	done bool
}

func (o *onLine) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.buf.Write(p)
	if !o.done && strings.Contains("\n"+o.buf.String(), "\n"+o.want+"\n") {
		o.done = true
		o.f()
	}
	return len(p), nil
}

func (o *onLine) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.buf.String()
}

func TestCancelSendsTermToGroup(t *testing.T) {
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "child")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	out := &onLine{want: "ready", f: cancel}
	// The child's own TERM trap must run: graceful stop, not SIGKILL.
	res, err := Run(ctx, Cmd{
		Argv:   bash(`trap 'echo got TERM; exit 143' TERM; sleep 300 & echo $! > ` + pidFile + `; echo ready; wait`),
		Stdout: out, Grace: 10 * time.Second,
	})
	require.NoError(t, err)
	assert.True(t, res.Stopped)
	assert.False(t, res.Killed)
	assert.Equal(t, 143, res.ExitCode)
	assert.Contains(t, out.String(), "got TERM")
	assert.False(t, alive(pidIn(t, pidFile)), "the background sleep in the group got TERM too")
}

func TestIgnoredTermIsKilledAfterGrace(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	out := &onLine{want: "ready", f: cancel}
	res, err := Run(ctx, Cmd{Argv: bash(`trap '' TERM; echo ready; while :; do sleep 0.05; done`), Stdout: out, Grace: 300 * time.Millisecond})
	require.NoError(t, err)
	assert.True(t, res.Stopped)
	assert.True(t, res.Killed)
	assert.True(t, res.Signaled)
	assert.Equal(t, syscall.SIGKILL, res.Signal)
}

// running is a shell function for test scripts: running PID NAME waits
// until process PID runs NAME (has got past fork, setsid and exec), so a
// test knows what it left behind.
const running = `running() { until [ "$(cat /proc/$1/comm 2>/dev/null)" = "$2" ]; do :; done; }
`

// hangLimit is how long a Run that should return at once may take before
// the test calls it a hang: far longer than any leftover grace, far
// shorter than a leftover's 300 s.
const hangLimit = 30 * time.Second

// runNoHang runs c and fails the test if Run waits for the leftover whose
// pid the script writes to pidFile: then the test kills that leftover
// itself, which is what ends such a Run, and reports the hang.
func runNoHang(t *testing.T, ctx context.Context, c Cmd, pidFile string) Result {
	t.Helper()
	type ran struct {
		res Result
		err error
	}
	ch := make(chan ran, 1)
	go func() {
		res, err := Run(ctx, c)
		ch <- ran{res, err}
	}()
	select {
	case r := <-ch:
		require.NoError(t, r.err)
		return r.res
	case <-time.After(hangLimit):
		if b, err := os.ReadFile(pidFile); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		<-ch
		t.Fatalf("Run did not return when the command ended: it waited for the process the command left running")
		return Result{}
	}
}

// Leftovers that escaped the process group (a new session, a double fork,
// nohup) or hold the output pipe: Run returns when the script ends, and
// they are gone by then. Each leftover would run 300 s: a Run that waited
// for it would hang (runNoHang), one that did not end it leaves it alive.
func TestLeftoversAreEndedWhenTheScriptEnds(t *testing.T) {
	tests := []struct {
		name   string
		script string // writes the leftover's pid to $PIDFILE
		names  []string
	}{
		{"in the group", `sleep 300 & echo $! > "$PIDFILE"`, []string{"sleep"}},
		{"setsid, holding the output", `setsid sleep 300 & echo $! > "$PIDFILE"`, []string{"sleep"}},
		{"double fork into a new session", `(setsid sleep 300 & echo $! > "$PIDFILE") & wait`, []string{"sleep"}},
		{"nohup, output elsewhere", `nohup setsid sleep 300 > /dev/null 2>&1 & echo $! > "$PIDFILE"`, []string{"sleep"}},
		{"daemon with a child", `setsid bash -c 'sleep 300 & echo $! > "$PIDFILE"; wait' & until [ -s "$PIDFILE" ]; do :; done`, []string{"bash", "sleep"}},
		{"stopped", `setsid sleep 300 & echo $! > "$PIDFILE"; running $! sleep; kill -STOP $!`, []string{"sleep"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pidFile := filepath.Join(t.TempDir(), "leftover")
			var out bytes.Buffer
			res := runNoHang(t, context.Background(), Cmd{
				Argv: bash(running + tt.script + `; running $(cat "$PIDFILE") sleep; echo done`), Env: []string{"PATH=/usr/bin:/bin", "PIDFILE=" + pidFile},
				Stdout: &out, Stderr: &out, Grace: 10 * time.Second,
			}, pidFile)
			assert.Equal(t, 0, res.ExitCode)
			assert.Equal(t, "done\n", out.String())
			pid := pidIn(t, pidFile)
			assert.False(t, alive(pid), "the leftover %d is gone when Run returns", pid)
			assert.Equal(t, tt.names, res.LeftBehind)
			assert.Empty(t, res.Survivors)
		})
	}
}

func TestLeftoversGetTermFirst(t *testing.T) {
	dir := t.TempDir()
	pidFile, termFile := filepath.Join(dir, "leftover"), filepath.Join(dir, "term")
	// The daemon says it is ready once its trap is set, and the script
	// waits for that before it ends.
	script := `setsid bash -c 'trap "echo got TERM > \"$TERMFILE\"; exit 0" TERM; echo $$ > "$PIDFILE"; while :; do read -t 1 x; done' <&- &
while [ ! -s "$PIDFILE" ]; do :; done`
	var out bytes.Buffer
	res := runNoHang(t, context.Background(), Cmd{
		Argv: bash(script), Env: []string{"PATH=/usr/bin:/bin", "PIDFILE=" + pidFile, "TERMFILE=" + termFile},
		Stdout: &out, Stderr: &out, Grace: 10 * time.Second,
	}, pidFile)
	assert.Equal(t, 0, res.ExitCode, out.String())
	assert.False(t, alive(pidIn(t, pidFile)))
	b, err := os.ReadFile(termFile)
	require.NoError(t, err, "the leftover's TERM trap ran")
	assert.Equal(t, "got TERM\n", string(b))
	assert.Equal(t, []string{"bash"}, res.LeftBehind)
}

func TestLeftoverIgnoringTermIsKilled(t *testing.T) {
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "leftover")
	script := running + `setsid bash -c 'trap "" TERM; exec sleep 300' & echo $! > "$PIDFILE"
running $! sleep`
	res := runNoHang(t, context.Background(), Cmd{
		Argv: bash(script), Env: []string{"PATH=/usr/bin:/bin", "PIDFILE=" + pidFile},
		Stdout: &bytes.Buffer{}, Grace: 200 * time.Millisecond,
	}, pidFile)
	assert.Equal(t, 0, res.ExitCode)
	assert.False(t, alive(pidIn(t, pidFile)), "SIGKILL after the grace ended it")
	assert.Equal(t, []string{"sleep"}, res.LeftBehind)
}

// On cancel, what escaped the group gets SIGTERM with the group, within
// the grace, and nothing holds Run afterwards.
func TestCancelEndsEscapedProcesses(t *testing.T) {
	dir := t.TempDir()
	pidFile, termFile := filepath.Join(dir, "leftover"), filepath.Join(dir, "term")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	out := &onLine{want: "ready", f: cancel}
	script := `setsid bash -c 'trap "echo got TERM > \"$TERMFILE\"; exit 0" TERM; echo $$ > "$PIDFILE"; while :; do read -t 1 x; done' <&- &
while [ ! -s "$PIDFILE" ]; do :; done
echo ready
wait`
	res := runNoHang(t, ctx, Cmd{
		Argv: bash(script), Env: []string{"PATH=/usr/bin:/bin", "PIDFILE=" + pidFile, "TERMFILE=" + termFile},
		Stdout: out, Stderr: out, Grace: 10 * time.Second,
	}, pidFile)
	assert.True(t, res.Stopped)
	assert.False(t, res.Killed)
	assert.False(t, alive(pidIn(t, pidFile)))
	b, err := os.ReadFile(termFile)
	require.NoError(t, err, "the escaped process got SIGTERM with the stage")
	assert.Equal(t, "got TERM\n", string(b))
}

// A Run that ends while another is in progress cannot tell its escaped
// processes from the other's: it leaves them to the last Run to end,
// and never touches the other Run's command.
func TestOverlappingRuns(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	require.NoError(t, unix.Mkfifo(fifo, 0o600))
	pidFile := filepath.Join(dir, "leftover")

	type ran struct {
		res Result
		err error
	}
	long := make(chan ran, 1)
	started := make(chan struct{})
	out := &onLine{want: "waiting", f: func() { close(started) }}
	go func() {
		res, err := Run(context.Background(), Cmd{Argv: bash(`echo waiting; read x < "$FIFO"; echo "got $x"`),
			Env: []string{"PATH=/usr/bin:/bin", "FIFO=" + fifo}, Stdout: out, Grace: time.Second})
		long <- ran{res, err}
	}()
	<-started

	res := runNoHang(t, context.Background(), Cmd{Argv: bash(running + `setsid sleep 300 & echo $! > "$PIDFILE"; running $! sleep`),
		Env: []string{"PATH=/usr/bin:/bin", "PIDFILE=" + pidFile}, Stdout: &bytes.Buffer{}, Grace: time.Second}, pidFile)
	assert.Empty(t, res.LeftBehind)
	pid := pidIn(t, pidFile)
	assert.True(t, alive(pid), "left to the Run still in progress")

	f, err := os.OpenFile(fifo, os.O_WRONLY, 0)
	require.NoError(t, err)
	_, err = f.WriteString("go\n")
	require.NoError(t, err)
	require.NoError(t, f.Close())
	r := <-long
	require.NoError(t, r.err)
	assert.Equal(t, 0, r.res.ExitCode, "the other Run's command was not touched")
	assert.Contains(t, out.String(), "got go")
	assert.Equal(t, []string{"sleep"}, r.res.LeftBehind, "the last Run to end ends it")
	assert.False(t, alive(pid))
}

// Pdeathsig is tied to the thread that forked the child (golang/go#27505).
// While Run waits, the Go runtime must not be able to end that thread: here
// Run's goroutine is parked between start and wait (as any blocking step
// there would park it) while goroutines that lock their thread and return
// end thread after thread, until one of them ran on the forking thread
// (which is then gone, and the child SIGKILLed) or enough have run that it
// surely would have, were it free.
func TestPdeathsigOutlivesThreadChurn(t *testing.T) {
	type started struct{ pid, tid int }
	parked, release := make(chan started), make(chan struct{})
	testHookStarted = func(pid int) {
		parked <- started{pid, unix.Gettid()}
		<-release
	}
	t.Cleanup(func() { testHookStarted = nil })
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	type ran struct {
		res Result
		err error
	}
	ch := make(chan ran, 1)
	go func() {
		res, err := Run(ctx, Cmd{Argv: []string{"/bin/sleep", "300"}, Grace: 5 * time.Second})
		ch <- ran{res, err}
	}()
	st := <-parked
	for range 500 {
		tid := make(chan int)
		go func() {
			runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
			tid <- unix.Gettid()
		}()
		if <-tid != st.tid {
			continue
		}
		// The forking thread is ending. It is gone from /proc only after
		// the kernel has sent its children's parent-death signals.
		for {
			if _, err := os.Stat(fmt.Sprintf("/proc/self/task/%d", st.tid)); err != nil {
				break
			}
			runtime.Gosched()
		}
		break
	}
	close(release)
	assert.True(t, alive(st.pid), "the child survived the runtime ending idle threads")
	cancel()
	r := <-ch
	require.NoError(t, r.err)
	assert.Equal(t, syscall.SIGTERM, r.res.Signal, "ended by the cancel, not by a parent-death SIGKILL")
}

// KillOrphans ends what reparented to this process outside any Run.
func TestKillOrphansEndsEscapedProcesses(t *testing.T) {
	pidFile := filepath.Join(t.TempDir(), "escaped")
	cmd := exec.Command("/bin/bash", "-c", running+`setsid sleep 300 < /dev/null > /dev/null 2>&1 & echo $! > `+pidFile+`; running $! sleep`)
	require.NoError(t, cmd.Run())
	pid := pidIn(t, pidFile)
	require.True(t, alive(pid))
	assert.Equal(t, []string{"sleep"}, KillOrphans())
	assert.False(t, alive(pid))
	assert.Empty(t, KillOrphans())
}

func TestSummary(t *testing.T) {
	assert.Equal(t, "", Summary(nil))
	assert.Equal(t, "stopped 1 process the stage left running: sleep", Summary([]string{"sleep"}))
	assert.Equal(t, "stopped 3 processes the stage left running: sleep, postgres", Summary([]string{"sleep", "postgres", "sleep"}))
	assert.Equal(t, "stopped 7 processes the stage left running: a, b, c, d, e, and 2 more",
		Summary([]string{"a", "b", "c", "d", "e", "f", "g"}))
	assert.Equal(t, "stopped 1 process the stage left running: x?[31m", Summary([]string{"x\x1b[31m"}))
}

// A process chooses its name, spaces and parentheses included: readStat
// must still find its state and parent.
func TestReadStatOddNames(t *testing.T) {
	dir := t.TempDir()
	odd := filepath.Join(dir, "a) b (c")
	require.NoError(t, os.Symlink("/bin/sleep", odd))
	cmd := exec.Command(odd, "300")
	require.NoError(t, cmd.Start())
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	var p procInfo
	for p.comm != "a) b (c" { // until it has exec'd
		var ok bool
		p, ok = readStat(cmd.Process.Pid)
		require.True(t, ok)
	}
	assert.Equal(t, os.Getpid(), p.ppid)
	assert.False(t, p.dead())
}
