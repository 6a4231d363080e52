package runnerdouble

import (
	"bytes"
	"os"
	"strconv"
	"time"
)

// peakRSSInterval is how often a running driver's peak RSS is read.
const peakRSSInterval = 2 * time.Millisecond

// peakRSS follows one driver process's own peak resident set size: the
// kernel's VmHWM of the process's memory since its exec. VmHWM only grows,
// so the last value read before the process exits is its peak up to then.
//
// wait4's ru_maxrss cannot serve: the kernel folds the parent's memory at
// the fork into the child's ru_maxrss when the child execs (exec_mmap
// keeps the old mm's high-water mark), and the parent here is a test
// process that may hold hundreds of MiB of earlier job logs.
type peakRSS struct {
	stop chan struct{}
	done chan int64
}

func watchPeakRSS(pid int) *peakRSS {
	p := &peakRSS{stop: make(chan struct{}), done: make(chan int64, 1)}
	path := "/proc/" + strconv.Itoa(pid) + "/status"
	go func() {
		var peak int64
		t := time.NewTicker(peakRSSInterval)
		defer t.Stop()
		for {
			if v, ok := readVmHWM(path); ok {
				peak = max(peak, v)
			}
			select {
			case <-p.stop:
				p.done <- peak
				return
			case <-t.C:
			}
		}
	}()
	return p
}

// end stops following and returns the peak in bytes (0 if never read).
func (p *peakRSS) end() int64 {
	close(p.stop)
	return <-p.done
}

// readVmHWM reads "VmHWM:   1234 kB" from a /proc status file; a zombie
// has none.
func readVmHWM(path string) (int64, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	i := bytes.Index(b, []byte("\nVmHWM:"))
	if i < 0 {
		return 0, false
	}
	line := b[i+len("\nVmHWM:"):]
	if j := bytes.IndexByte(line, '\n'); j >= 0 {
		line = line[:j]
	}
	f := bytes.Fields(line)
	if len(f) != 2 || string(f[1]) != "kB" {
		return 0, false
	}
	kb, err := strconv.ParseInt(string(f[0]), 10, 64)
	if err != nil {
		return 0, false
	}
	return kb << 10, true
}
