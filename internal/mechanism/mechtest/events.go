package mechtest

import (
	"bytes"
	"fmt"
	"strings"
	"sync"
	"time"
)

// LogWatch is a job log that tells when a line appears: tests wait for
// what the code under test says it does ("Waiting: ..."), not for time to
// pass. It is safe for concurrent use.
type LogWatch struct {
	mu    sync.Mutex
	buf   bytes.Buffer
	watch []watched
}

type watched struct {
	text string
	seen chan struct{}
}

// Write records p and signals the watches whose text it completes.
func (w *LogWatch) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	w.check()
	return len(p), nil
}

func (w *LogWatch) check() {
	kept := w.watch[:0]
	for _, x := range w.watch {
		if strings.Contains(w.buf.String(), x.text) {
			close(x.seen)
			continue
		}
		kept = append(kept, x)
	}
	w.watch = kept
}

// Seen returns a channel closed once the log contains text.
func (w *LogWatch) Seen(text string) <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	x := watched{text: text, seen: make(chan struct{})}
	w.watch = append(w.watch, x)
	w.check()
	return x.seen
}

// Wait waits until the log contains text. It gives up after a minute,
// with an error for the test's goroutine to report: a guard against a
// hang, not a measure of time.
func (w *LogWatch) Wait(text string) error {
	select {
	case <-w.Seen(text):
		return nil
	case <-time.After(time.Minute):
		return fmt.Errorf("the job log never said %q; it has:\n%s", text, w.String())
	}
}

// String is the log so far.
func (w *LogWatch) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}
