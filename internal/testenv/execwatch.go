package testenv

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// The kernel's process events connector (linux/cn_proc.h, connector.h):
// over a NETLINK_CONNECTOR socket it reports every fork, exec and exit on
// the host to a listener with CAP_NET_ADMIN.
const (
	cnIdxProc          = 1
	cnValProc          = 1
	procCnMcastListen  = 1
	procEventExec      = 0x00000002
	nlmsgHdrLen        = 16
	cnMsgLen           = 20
	procEventHeaderLen = 16 // what, cpu, timestamp_ns
)

// execListener delivers the PID of every process that calls execve, as the
// kernel reports it, so that a watcher can read its argv at once instead of
// hoping a poll of /proc catches a process that lives a millisecond.
type execListener struct {
	fd   int
	stop chan struct{}
	done chan struct{}
	// Lost is set when the kernel dropped events (socket buffer full).
	mu   sync.Mutex
	lost bool
}

// listenExecs subscribes to exec events and calls fn(pid) for each one on
// its own goroutine until close. It fails without CAP_NET_ADMIN.
func listenExecs(fn func(pid int)) (*execListener, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_CONNECTOR)
	if err != nil {
		return nil, err
	}
	// A large buffer: a busy host execs in bursts.
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 8<<20)
	// The receive timeout lets the loop see close(); closing the socket
	// does not wake a blocked recvfrom.
	tv := unix.NsecToTimeval((50 * time.Millisecond).Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, err
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: cnIdxProc}); err != nil {
		unix.Close(fd)
		return nil, err
	}
	msg := make([]byte, nlmsgHdrLen+cnMsgLen+4)
	le := binary.LittleEndian // the connector speaks host byte order; amd64/arm64 hosts are little-endian
	le.PutUint32(msg[0:], uint32(len(msg)))
	le.PutUint16(msg[4:], unix.NLMSG_DONE)
	le.PutUint32(msg[12:], uint32(os.Getpid()))
	le.PutUint32(msg[16:], cnIdxProc)
	le.PutUint32(msg[20:], cnValProc)
	le.PutUint16(msg[32:], 4)
	le.PutUint32(msg[36:], procCnMcastListen)
	if err := unix.Sendto(fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, err
	}
	l := &execListener{fd: fd, stop: make(chan struct{}), done: make(chan struct{})}
	go l.loop(fn)
	return l, nil
}

func (l *execListener) loop(fn func(pid int)) {
	// A thread of its own: the read after an exec races the new
	// program's exit, and waiting for the scheduler loses it.
	runtime.LockOSThread()
	defer close(l.done)
	defer unix.Close(l.fd)
	buf := make([]byte, 64<<10)
	le := binary.LittleEndian
	for {
		select {
		case <-l.stop:
			return
		default:
		}
		n, _, err := unix.Recvfrom(l.fd, buf, 0)
		if errors.Is(err, unix.ENOBUFS) {
			l.mu.Lock()
			l.lost = true
			l.mu.Unlock()
			continue
		}
		if err != nil {
			continue // EAGAIN from the receive timeout, EINTR
		}
		for off := 0; off+nlmsgHdrLen <= n; {
			mlen := int(le.Uint32(buf[off:]))
			if mlen < nlmsgHdrLen || off+mlen > n {
				break
			}
			ev := buf[off+nlmsgHdrLen+cnMsgLen : off+mlen]
			if len(ev) >= procEventHeaderLen+8 && le.Uint32(ev) == procEventExec {
				fn(int(le.Uint32(ev[procEventHeaderLen+4:]))) // process_tgid
			}
			off += (mlen + 3) &^ 3
		}
	}
}

// close stops the listener and reports whether the kernel dropped events.
func (l *execListener) close() (lost bool) {
	close(l.stop)
	<-l.done
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lost
}

// cmdline reads a process's argv as ps shows it ("" once it is gone).
func cmdline(pid string) string {
	b, err := os.ReadFile(filepath.Join("/proc", pid, "cmdline"))
	if err != nil {
		return ""
	}
	return strings.ReplaceAll(string(b), "\x00", " ")
}

// cmdlineWatch is WatchCmdlines' state.
type cmdlineWatch struct {
	needles []string
	// withUID prefixes each hit with "uid=<real uid> ".
	withUID bool
	mu      sync.Mutex
	seen    map[string]bool
	hits    []string
}

func (w *cmdlineWatch) check(pid string) {
	line := cmdline(pid)
	if line == "" {
		return
	}
	for _, n := range w.needles {
		if n != "" && strings.Contains(line, n) {
			if w.withUID {
				line = "uid=" + realUID(pid) + " " + line
			}
			w.mu.Lock()
			if !w.seen[line] {
				w.seen[line] = true
				w.hits = append(w.hits, line)
			}
			w.mu.Unlock()
			return
		}
	}
}

func (w *cmdlineWatch) poll() {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		if e.Name()[0] >= '0' && e.Name()[0] <= '9' {
			w.check(e.Name())
		}
	}
}

// ExecEvents reports whether WatchCmdlines gets every exec from the kernel
// (root, or CAP_NET_ADMIN); without them it only polls.
func ExecEvents() bool {
	l, err := listenExecs(func(int) {})
	if err != nil {
		return false
	}
	l.close()
	return true
}

func itoa(pid int) string { return strconv.Itoa(pid) }

// realUID is a process's real uid from /proc ("?" once it is gone).
func realUID(pid string) string {
	b, err := os.ReadFile(filepath.Join("/proc", pid, "status"))
	if err != nil {
		return "?"
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 1 && f[0] == "Uid:" {
			return f[1]
		}
	}
	return "?"
}
