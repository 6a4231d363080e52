package proc

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unicode"

	"golang.org/x/sys/unix"
)

// How leftovers are ended. A stage is over when its script is: what the
// script left running (a daemon, a setsid'd or double-forked job, a process
// still holding the output pipe) gets SIGTERM, then SIGKILL after
// LeftoverGrace (or Cmd.Grace when shorter). The grace is short on purpose:
// a leftover's own shutdown is not what the job waits for, and a daemon that
// does not act on SIGTERM within two seconds is not going to.
const (
	LeftoverGrace = 2 * time.Second
	// killWait bounds the wait for SIGKILLed processes to disappear (a
	// process in uninterruptible sleep on a dead NFS server); those left
	// are reported as survivors instead of holding the stage.
	killWait = 5 * time.Second
	// drainIdle is how long the output is still read, once nothing that
	// could write it is left, without a byte arriving: a writer ci-exec
	// could not stop must not hold the stage through the pipe.
	drainIdle = 250 * time.Millisecond
)

// subreaper is set by BecomeSubreaper: orphans of this process's
// descendants then reparent to it, so Run can find what a command left
// behind even when it escaped with setsid or a double fork.
var subreaper atomic.Bool

// BecomeSubreaper makes orphaned descendants (processes that left their
// group with setsid, or whose parent exited) reparent to this process
// instead of init, so that Run and KillOrphans find and end them. It is
// process-wide: call it once, from main.
func BecomeSubreaper() error {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return err
	}
	subreaper.Store(true)
	return nil
}

// reg knows the main children of the Runs in progress. Run holds it while
// it starts a child and while it enumerates and signals, so a child being
// started is never mistaken for another Run's leftover.
//
// Once a command has exited, what it left behind hangs off this process
// like any other orphan: nothing tells whose it was. So a Run that ends
// while another is in progress ends only its own process group and leaves
// the rest to the last Run to end (ci-exec runs one command at a time, so
// this is exact there). Children started without Run (os/exec) count as
// leftovers when a Run ends: start them through Run.
var reg = struct {
	sync.Mutex
	mains map[int]bool
}{mains: map[int]bool{}}

// procInfo is what /proc/PID/stat says about a process.
type procInfo struct {
	pid, ppid int
	state     byte
	comm      string
}

func (p procInfo) dead() bool { return p.state == 'Z' || p.state == 'X' }

// readStat parses /proc/PID/stat; ok is false when the process is gone.
func readStat(pid int) (procInfo, bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return procInfo{}, false
	}
	// "pid (comm) state ppid ...": comm may hold spaces and ')', so it
	// ends at the last ')'.
	open, end := bytes.IndexByte(b, '('), bytes.LastIndexByte(b, ')')
	if open < 0 || end < open {
		return procInfo{}, false
	}
	f := strings.Fields(string(b[end+1:]))
	if len(f) < 2 || len(f[0]) == 0 {
		return procInfo{}, false
	}
	ppid, err := strconv.Atoi(f[1])
	if err != nil {
		return procInfo{}, false
	}
	return procInfo{pid: pid, ppid: ppid, state: f[0][0], comm: string(b[open+1 : end])}, true
}

// childrenFiles reports whether the kernel lists a task's children in
// /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN, on in the common
// distributions' kernels): far cheaper than reading every process's stat.
var childrenFiles = sync.OnceValue(func() bool {
	self := strconv.Itoa(os.Getpid())
	_, err := os.Stat("/proc/" + self + "/task/" + self + "/children")
	return err == nil
})

// childrenOf lists pid's children from the children file of each of its
// threads (an orphan is adopted by any thread of its new parent).
func childrenOf(pid int) []int {
	dir := "/proc/" + strconv.Itoa(pid) + "/task/"
	d, err := os.Open(dir)
	if err != nil {
		return nil
	}
	tids, _ := d.Readdirnames(-1)
	d.Close()
	var out []int
	for _, tid := range tids {
		b, err := os.ReadFile(dir + tid + "/children")
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if c, err := strconv.Atoi(f); err == nil {
				out = append(out, c)
			}
		}
	}
	return out
}

// hasChildren reports whether this process has any child, live or
// zombie, without reaping one: one system call, where walking /proc costs
// dozens. Every descendant of a subreaper hangs off one of its children.
func hasChildren() bool {
	var info unix.Siginfo
	err := unix.Waitid(unix.P_ALL, 0, &info, unix.WEXITED|unix.WNOHANG|unix.WNOWAIT, nil)
	return !errors.Is(err, syscall.ECHILD)
}

// descendants returns every descendant of root, live or zombie, but not
// the processes in skip and their own descendants. full reads every
// process's stat instead of the children files.
func descendants(root int, skip map[int]bool, full bool) map[int]procInfo {
	out := map[int]procInfo{}
	if full || !childrenFiles() {
		kids := map[int][]procInfo{}
		for _, pid := range allPIDs() {
			if p, ok := readStat(pid); ok {
				kids[p.ppid] = append(kids[p.ppid], p)
			}
		}
		queue := []int{root}
		for len(queue) > 0 {
			pid := queue[0]
			queue = queue[1:]
			for _, p := range kids[pid] {
				if skip[p.pid] || out[p.pid].pid != 0 {
					continue
				}
				out[p.pid] = p
				queue = append(queue, p.pid)
			}
		}
		return out
	}
	queue := []int{root}
	for len(queue) > 0 {
		pid := queue[0]
		queue = queue[1:]
		for _, c := range childrenOf(pid) {
			if skip[c] || out[c].pid != 0 {
				continue
			}
			p, ok := readStat(c)
			if !ok {
				continue
			}
			out[c] = p
			if !p.dead() {
				queue = append(queue, c)
			}
		}
	}
	return out
}

func allPIDs() []int {
	d, err := os.Open("/proc")
	if err != nil {
		return nil
	}
	defer d.Close()
	names, _ := d.Readdirnames(-1)
	var out []int
	for _, n := range names {
		if pid, err := strconv.Atoi(n); err == nil {
			out = append(out, pid)
		}
	}
	return out
}

// family returns the processes a Run answers for besides its process
// group: when this process is a subreaper and no other Run is in
// progress, every descendant of this process; otherwise the descendants
// of main while it lives (and main itself). The caller holds reg.
func family(main int, full bool) map[int]procInfo {
	self := os.Getpid()
	if subreaper.Load() && (len(reg.mains) == 0 || len(reg.mains) == 1 && reg.mains[main]) {
		if !hasChildren() {
			return nil
		}
		return descendants(self, keptSet(), full)
	}
	if !reg.mains[main] {
		return nil
	}
	out := descendants(main, keptSet(), full)
	if p, ok := readStat(main); ok {
		out[main] = p
	}
	return out
}

// signalAll sends sig (after SIGCONT: a stopped process would never act
// on it) to main's process group and to main's family.
func signalAll(main int, sig syscall.Signal) {
	reg.Lock()
	defer reg.Unlock()
	_ = syscall.Kill(-main, syscall.SIGCONT)
	_ = syscall.Kill(-main, sig)
	for pid, p := range family(main, false) {
		if !p.dead() {
			_ = syscall.Kill(pid, syscall.SIGCONT)
			_ = syscall.Kill(pid, sig)
		}
	}
}

// leftovers is what endLeftovers found.
type leftovers struct {
	// names has the command name of each process that was still running
	// and was signalled, in pid order.
	names []string
	// survivors are the ones that could not be ended: not ours to signal
	// (EPERM), or still there killWait after SIGKILL.
	survivors []string
}

// endLeftovers ends what the Run of main (already reaped) left running:
// SIGTERM now, SIGKILL at killAt, until nothing is left, reaping the
// orphans that are this process's children. Output pipes are not waited
// for: the processes are found in /proc.
func endLeftovers(main int, killAt time.Time) leftovers {
	reg.Lock()
	sole := subreaper.Load() && len(reg.mains) == 0
	reg.Unlock()
	if !sole {
		// Another Run is in progress: this one's escaped processes cannot
		// be told from that one's and are left to whichever Run ends last
		// (see reg). Its process group is surely its own.
		_ = syscall.Kill(-main, syscall.SIGKILL)
		return leftovers{}
	}
	self := os.Getpid()
	seen := map[int]string{}
	termed := map[int]bool{}
	denied := map[int]string{}
	var survivors []string
	interval := time.Millisecond
	full := false
	for {
		reg.Lock()
		procs := family(main, full)
		live := 0
		now := time.Now()
		for pid, p := range procs {
			if p.dead() {
				if p.ppid == self {
					var ws syscall.WaitStatus
					_, _ = syscall.Wait4(pid, &ws, syscall.WNOHANG, nil)
				}
				continue
			}
			if _, ok := denied[pid]; ok {
				continue
			}
			// The latest name: a leftover caught between fork and exec
			// is known by what it runs when it is ended.
			seen[pid] = p.comm
			sig := syscall.SIGTERM
			if !now.Before(killAt) {
				sig = syscall.SIGKILL
			} else if termed[pid] {
				live++
				continue
			}
			_ = syscall.Kill(pid, syscall.SIGCONT)
			if err := syscall.Kill(pid, sig); errors.Is(err, syscall.EPERM) {
				denied[pid] = p.comm
				continue
			}
			termed[pid] = true
			live++
		}
		reg.Unlock()
		if live == 0 {
			if len(seen) == 0 || full {
				break
			}
			// The children files are a snapshot per thread: confirm with
			// every process's stat before calling it done.
			full = true
			continue
		}
		full = false
		if now.After(killAt.Add(killWait)) {
			for pid, p := range procs {
				if _, no := denied[pid]; !p.dead() && !no {
					survivors = append(survivors, p.comm)
				}
			}
			break
		}
		time.Sleep(interval)
		interval = min(2*interval, 50*time.Millisecond)
	}
	var l leftovers
	pids := make([]int, 0, len(seen))
	for pid := range seen {
		if _, ok := denied[pid]; !ok {
			pids = append(pids, pid)
		}
	}
	slices.Sort(pids)
	for _, pid := range pids {
		l.names = append(l.names, seen[pid])
	}
	for _, n := range denied {
		l.survivors = append(l.survivors, n)
	}
	l.survivors = append(l.survivors, survivors...)
	slices.Sort(l.survivors)
	return l
}

// KillOrphans SIGKILLs every remaining descendant of this process that is
// not the command of a Run in progress, reaps the ones that are its
// children, and returns their command names. Run already ends what its
// command leaves behind; this is the last sweep before the process exits,
// for what a Run could not attribute.
func KillOrphans() []string {
	self := os.Getpid()
	seen := map[int]string{}
	full := false
	for range 100 {
		if !hasChildren() {
			break
		}
		reg.Lock()
		skip := keptSet()
		if skip == nil {
			skip = reg.mains
		} else {
			for p := range reg.mains {
				skip[p] = true
			}
		}
		procs := descendants(self, skip, full)
		live := 0
		for pid, p := range procs {
			if p.dead() {
				if p.ppid == self {
					var ws syscall.WaitStatus
					_, _ = syscall.Wait4(pid, &ws, syscall.WNOHANG, nil)
				}
				continue
			}
			if _, ok := seen[pid]; !ok {
				seen[pid] = p.comm
			}
			if syscall.Kill(pid, syscall.SIGKILL) == nil {
				live++
			}
		}
		reg.Unlock()
		if live == 0 {
			if len(seen) == 0 || full {
				break
			}
			full = true // confirm, as endLeftovers does
			continue
		}
		full = false
		time.Sleep(10 * time.Millisecond)
	}
	pids := make([]int, 0, len(seen))
	for pid := range seen {
		pids = append(pids, pid)
	}
	slices.Sort(pids)
	names := make([]string, 0, len(pids))
	for _, pid := range pids {
		names = append(names, seen[pid])
	}
	return names
}

// maxNames is how many distinct command names Summary lists.
const maxNames = 5

// Summary is the job-log line for the processes a stage left running
// ("stopped 2 processes the stage left running: sleep, postgres"), one
// name per process as in Result.LeftBehind; "" for none.
func Summary(names []string) string {
	if len(names) == 0 {
		return ""
	}
	var distinct []string
	for _, n := range names {
		n = printable(n)
		if !slices.Contains(distinct, n) {
			distinct = append(distinct, n)
		}
	}
	list := distinct
	if len(list) > maxNames {
		list = append(slices.Clip(list[:maxNames]), fmt.Sprintf("and %d more", len(distinct)-maxNames))
	}
	noun := "processes"
	if len(names) == 1 {
		noun = "process"
	}
	return fmt.Sprintf("stopped %d %s the stage left running: %s", len(names), noun, strings.Join(list, ", "))
}

// printable keeps a command name (which the process chose) from carrying
// control characters into the job log.
func printable(s string) string {
	return strings.Map(func(r rune) rune {
		if r == unicode.ReplacementChar || !unicode.IsPrint(r) {
			return '?'
		}
		return r
	}, s)
}

// kept are processes started on purpose to outlive the stage that started
// them (a job's services, see package services): no Run ends them or
// anything below them as leftovers.
var kept = struct {
	sync.Mutex
	pids map[int]bool
}{pids: map[int]bool{}}

// StartKept starts cmd (os/exec) as a process that is not a leftover: it
// and its descendants are never ended by a Run of this process. It holds
// reg while it starts, as Run does, so a Run ending meanwhile cannot take
// the new child for its own leftover.
func StartKept(cmd *exec.Cmd) error {
	reg.Lock()
	defer reg.Unlock()
	if err := cmd.Start(); err != nil {
		return err
	}
	Keep(cmd.Process.Pid)
	return nil
}

// Keep exempts pid (and what runs below it) from leftover ending in this
// process: a downscoping front calls it with the PIDs its stage kept.
func Keep(pid int) {
	kept.Lock()
	kept.pids[pid] = true
	kept.Unlock()
}

func keptSet() map[int]bool {
	kept.Lock()
	defer kept.Unlock()
	if len(kept.pids) == 0 {
		return nil
	}
	out := make(map[int]bool, len(kept.pids))
	for p := range kept.pids {
		out[p] = true
	}
	return out
}

// KeepFileVariable names, in a stage's environment, a file where the
// stage appends the PIDs it keeps (one per line), for a parent that is a
// subreaper itself and runs the stage through Run (ci-exec exec): its
// Cmd.Keep reads them with ReadKeepFile. A downscoping front gets them in
// the stage's result instead.
const KeepFileVariable = "CI_EXEC_KEEP_FILE"

// AppendKeepFile records pid in the keep file at path.
func AppendKeepFile(path string, pid int) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(f, pid)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// ReadKeepFile returns the PIDs in the keep file at path (none when it is
// missing or unreadable).
func ReadKeepFile(path string) []int {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	var out []int
	for _, l := range strings.Fields(string(b)) {
		if pid, err := strconv.Atoi(l); err == nil && pid > 1 {
			out = append(out, pid)
		}
	}
	return out
}
