package services

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ci-exec/ci-exec/internal/proc"
)

// Running is a started service, as the job's state keeps it.
type Running struct {
	// Name is the service's first host name; Hosts all of them.
	Name  string   `json:"name"`
	Hosts []string `json:"hosts"`
	Image string   `json:"image"`
	// PID is the process ci-exec started, the leader of a session of its
	// own (setsid): the session id is PID for as long as any process of
	// the service lives, and the kernel hands out no PID still in use as
	// a session id, so a session id cannot come to name someone else's.
	PID int `json:"pid"`
	// StartTime is the kernel's start time of PID (/proc/PID/stat field
	// 22): the PID is this process only while it matches.
	StartTime uint64 `json:"start_time"`
	// Log has the service's output.
	Log   string `json:"log"`
	Ports []int  `json:"ports,omitempty"`
}

// Start runs argv in the background, in a new session, with its output in
// logPath, and returns the record that later stages stop it by. The
// process is kept out of the leftover reaping of this ci-exec process
// (proc.Keep): it is meant to outlive the stage.
func Start(argv, env []string, dir, logPath string) (Running, error) {
	out, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return Running{}, fmt.Errorf("create the service log: %w", err)
	}
	defer out.Close()
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		return Running{}, err
	}
	defer devnull.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env, cmd.Dir = env, dir
	cmd.Stdin, cmd.Stdout, cmd.Stderr = devnull, out, out
	// Its own session: the runner's SIGTERM to a stage's process group
	// never reaches it, and the session id finds all of it at the end.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := proc.StartKept(cmd); err != nil {
		return Running{}, err
	}
	pid := cmd.Process.Pid
	st, ok := startTime(pid)
	if !ok {
		return Running{}, fmt.Errorf("%s ended at once", filepath.Base(argv[0]))
	}
	// Not waited for here: a later stage stops it. Release lets go of
	// the handle; the subreaper reaps it if it ends while this stage runs.
	_ = cmd.Process.Release()
	return Running{PID: pid, StartTime: st, Log: logPath}, nil
}

// Alive reports whether the service's own process still runs.
func (r Running) Alive() bool {
	st, ok := startTime(r.PID)
	return ok && st == r.StartTime && !zombie(r.PID)
}

// processes are the service's processes still there: its session, and
// any descendant of its leader that made a session of its own.
func (r Running) processes() []int {
	if st, ok := startTime(r.PID); ok && st != r.StartTime {
		// The PID is another process's now, so the service's session is
		// gone (its id could not be reused while a member lived): a
		// session of that id is the newcomer's, never ours to end.
		return nil
	}
	var out []int
	kids := map[int][]int{}
	sess := map[int]bool{}
	for _, pid := range allPIDs() {
		f, ok := statFields(pid)
		if !ok || f.state == 'Z' || f.state == 'X' {
			continue
		}
		kids[f.ppid] = append(kids[f.ppid], pid)
		if f.sid == r.PID {
			sess[pid] = true
		}
	}
	if r.Alive() {
		queue := []int{r.PID}
		for len(queue) > 0 {
			p := queue[0]
			queue = queue[1:]
			sess[p] = true
			queue = append(queue, kids[p]...)
		}
	}
	for p := range sess {
		out = append(out, p)
	}
	return out
}

// Stop ends the service: SIGTERM to all of it, SIGKILL after grace, and
// returns the names of processes that could not be ended.
func (r Running) Stop(grace time.Duration) []string {
	if r.PID <= 1 {
		return nil
	}
	signal := func(sig syscall.Signal) int {
		n := 0
		for _, p := range r.processes() {
			_ = syscall.Kill(p, syscall.SIGCONT)
			if syscall.Kill(p, sig) == nil {
				n++
			}
		}
		return n
	}
	if signal(syscall.SIGTERM) == 0 {
		return nil
	}
	if waitGone(r, grace) {
		return nil
	}
	signal(syscall.SIGKILL)
	if waitGone(r, 5*time.Second) {
		return nil
	}
	var left []string
	for _, p := range r.processes() {
		if f, ok := statFields(p); ok {
			left = append(left, fmt.Sprintf("%s (pid %d)", f.comm, p))
		}
	}
	return left
}

// waitGone polls until no process of the service is left, at most d.
// Polling, because these processes are not this process's children: no
// wait or pidfd of a stranger tells when it ends.
func waitGone(r Running, d time.Duration) bool {
	deadline := time.Now().Add(d)
	interval := time.Millisecond
	for {
		if len(r.processes()) == 0 {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(interval)
		interval = min(interval*2, 100*time.Millisecond)
	}
}

// ErrExited is a service that ended before it listened on its ports.
var ErrExited = errors.New("the service exited")

// PortTakenError is a port another process listens on.
type PortTakenError struct{ Port int }

func (e *PortTakenError) Error() string {
	return fmt.Sprintf("port %d is already in use on this host by a process that is not this job's service (another job's service with the same port?)", e.Port)
}

// CheckFree returns a *PortTakenError for the first of ports something
// listens on already.
func CheckFree(ports []int) error {
	l := listening()
	for _, p := range ports {
		if len(l[p]) > 0 {
			return &PortTakenError{Port: p}
		}
	}
	return nil
}

// Wait waits until the service listens on all its ports (checked as the
// kernel's listening sockets held by the service's processes, so another
// process on the same port is told apart), the service exits (ErrExited),
// the port is someone else's (*PortTakenError), or ctx ends.
func (r Running) Wait(ctx context.Context) error {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		if !r.Alive() {
			return ErrExited
		}
		ready, err := r.listens()
		if ready || err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

func (r Running) listens() (bool, error) {
	l := listening()
	var mine map[uint64]bool
	for _, port := range r.Ports {
		inodes := l[port]
		if len(inodes) == 0 {
			return false, nil
		}
		if mine == nil {
			mine = r.sockets()
		}
		ours := false
		for _, ino := range inodes {
			ours = ours || mine[ino]
		}
		if !ours {
			// A socket of ours may be between its creation and our read
			// of the fds: look once more before calling it a clash.
			mine = r.sockets()
			for _, ino := range inodes {
				ours = ours || mine[ino]
			}
			if !ours {
				return false, &PortTakenError{Port: port}
			}
		}
	}
	return true, nil
}

// sockets are the socket inodes the service's processes hold.
func (r Running) sockets() map[uint64]bool {
	out := map[uint64]bool{}
	for _, p := range r.processes() {
		dir := "/proc/" + strconv.Itoa(p) + "/fd"
		ents, err := os.ReadDir(dir)
		if err != nil {
			continue
		}
		for _, e := range ents {
			l, err := os.Readlink(filepath.Join(dir, e.Name()))
			if err != nil || !strings.HasPrefix(l, "socket:[") {
				continue
			}
			if ino, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(l, "socket:["), "]"), 10, 64); err == nil {
				out[ino] = true
			}
		}
	}
	return out
}

// listening maps each TCP port in LISTEN state (IPv4 and IPv6, any
// address) to its sockets' inodes.
func listening() map[int][]uint64 {
	out := map[int][]uint64{}
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(bytes.NewReader(b))
		sc.Scan() // header
		for sc.Scan() {
			fs := strings.Fields(sc.Text())
			if len(fs) < 10 || fs[3] != "0A" {
				continue
			}
			_, portHex, ok := strings.Cut(fs[1], ":")
			if !ok {
				continue
			}
			port, err1 := strconv.ParseUint(portHex, 16, 16)
			ino, err2 := strconv.ParseUint(fs[9], 10, 64)
			if err1 == nil && err2 == nil {
				out[int(port)] = append(out[int(port)], ino)
			}
		}
	}
	return out
}

// LastLines returns the last n non-empty lines of the service's log.
func (r Running) LastLines(n int) []string {
	b, err := os.ReadFile(r.Log)
	if err != nil {
		return nil
	}
	var lines []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.TrimSpace(l) != "" {
			lines = append(lines, l)
		}
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return lines
}

type stat struct {
	state     byte
	ppid, sid int
	comm      string
	start     uint64
}

func statFields(pid int) (stat, bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return stat{}, false
	}
	open, end := bytes.IndexByte(b, '('), bytes.LastIndexByte(b, ')')
	if open < 0 || end < open {
		return stat{}, false
	}
	// After "pid (comm)": state ppid pgrp session ... starttime (field 22,
	// the 20th after comm).
	f := strings.Fields(string(b[end+1:]))
	if len(f) < 20 || len(f[0]) == 0 {
		return stat{}, false
	}
	ppid, _ := strconv.Atoi(f[1])
	sid, _ := strconv.Atoi(f[3])
	start, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return stat{}, false
	}
	return stat{state: f[0][0], ppid: ppid, sid: sid, comm: string(b[open+1 : end]), start: start}, true
}

func startTime(pid int) (uint64, bool) {
	f, ok := statFields(pid)
	return f.start, ok
}

func zombie(pid int) bool {
	f, ok := statFields(pid)
	return !ok || f.state == 'Z' || f.state == 'X'
}

func allPIDs() []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []int
	for _, e := range ents {
		if pid, err := strconv.Atoi(e.Name()); err == nil {
			out = append(out, pid)
		}
	}
	return out
}
