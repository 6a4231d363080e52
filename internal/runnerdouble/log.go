package runnerdouble

import (
	"bytes"
	"io"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
)

// jobLog is the job trace: it keeps the raw bytes, a masked copy built line
// by line, tees the masked lines to an optional live writer, and watches
// complete lines for the cancel marker.
type jobLog struct {
	mu      sync.Mutex
	raw     bytes.Buffer
	masked  bytes.Buffer
	pending []byte
	live    io.Writer
	phrases []string

	marker   string
	onMarker func()
	fired    bool
}

func newJobLog(live io.Writer, maskPhrases []string, marker string, onMarker func()) *jobLog {
	var ph []string
	for _, p := range maskPhrases {
		if p != "" {
			ph = append(ph, p)
		}
	}
	sort.Slice(ph, func(i, k int) bool { return len(ph[i]) > len(ph[k]) })
	return &jobLog{live: live, phrases: ph, marker: marker, onMarker: onMarker}
}

func (l *jobLog) Write(p []byte) (int, error) {
	fire := false
	l.mu.Lock()
	l.raw.Write(p)
	l.pending = append(l.pending, p...)
	for {
		i := bytes.IndexByte(l.pending, '\n')
		if i < 0 {
			break
		}
		line := make([]byte, i+1)
		copy(line, l.pending[:i+1])
		l.pending = l.pending[i+1:]
		if l.emit(line) {
			fire = true
		}
	}
	if len(l.pending) == 0 {
		l.pending = nil
	}
	l.mu.Unlock()
	if fire {
		l.onMarker()
	}
	return len(p), nil
}

// emit writes one (complete or final partial) line to the masked log and the
// live writer; it reports whether the cancel marker fired. Called with mu held.
func (l *jobLog) emit(line []byte) bool {
	m := line
	if len(l.phrases) > 0 {
		s := string(line)
		for _, p := range l.phrases {
			s = strings.ReplaceAll(s, p, "[MASKED]")
		}
		m = []byte(s)
	}
	l.masked.Write(m)
	if l.live != nil {
		_, _ = l.live.Write(m)
	}
	if l.marker == "" || l.fired || l.onMarker == nil {
		return false
	}
	text := strings.TrimRight(string(line), "\r\n")
	if strings.HasPrefix(text, "$ ") || !strings.Contains(text, l.marker) {
		return false
	}
	l.fired = true
	return true
}

// flush emits a pending partial line (end of a driver call).
func (l *jobLog) flush() {
	l.mu.Lock()
	fire := false
	if len(l.pending) > 0 {
		fire = l.emit(l.pending)
		l.pending = nil
	}
	l.mu.Unlock()
	if fire {
		l.onMarker()
	}
}

// println adds a runner line to the log (never matched against the marker).
func (l *jobLog) println(s string) {
	l.flush()
	l.mu.Lock()
	defer l.mu.Unlock()
	line := []byte(s + "\n")
	l.raw.Write(line)
	marker := l.marker
	l.marker = ""
	l.emit(line)
	l.marker = marker
}

func (l *jobLog) strings() (masked, raw string) {
	l.flush()
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.masked.String(), l.raw.String()
}

// syncBuffer is a goroutine-safe bytes.Buffer.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// gate forwards writes until closed, then drops them; it keeps a call that
// the double gave up on from writing into the log later.
type gate struct {
	w      io.Writer
	closed atomic.Bool
}

func (g *gate) Write(p []byte) (int, error) {
	if g.closed.Load() {
		return len(p), nil
	}
	return g.w.Write(p)
}
