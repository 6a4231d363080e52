// Package joblog writes ci-exec's own lines to the job log: plain notices,
// warnings and errors, GitLab's collapsible sections, and redaction of
// secrets, so that nothing ci-exec prints can leak a token even when it
// echoes a command line or a runtime's error output.
package joblog

import (
	"bytes"
	"fmt"
	"io"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"
)

// Masked replaces a secret in the log, as the runner does for masked variables.
const Masked = "[MASKED]"

// ANSI styles the runner's own job-log lines use.
const (
	ansiReset  = "\033[0;m"
	ansiBold   = "\033[1m"
	ansiGreen  = "\033[32;1m"
	ansiYellow = "\033[0;33m"
	ansiRed    = "\033[31;1m"
	clearLine  = "\033[0K"
)

// Logger writes to the job log. It is safe for concurrent use.
type Logger struct {
	mu      sync.Mutex
	w       io.Writer
	secrets []string
	now     func() time.Time
}

// New returns a logger that writes to w (the stage's stdout or stderr, which
// the runner copies into the job log).
func New(w io.Writer) *Logger { return &Logger{w: w, now: time.Now} }

// AddSecrets registers values to mask; short values are ignored because
// masking them would garble ordinary words (GitLab requires 8 characters).
func (l *Logger) AddSecrets(secrets ...string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, s := range secrets {
		if len(s) >= 8 {
			l.secrets = append(l.secrets, s)
		}
	}
	// Longest first, so a secret that contains another is masked whole.
	sort.Slice(l.secrets, func(i, j int) bool { return len(l.secrets[i]) > len(l.secrets[j]) })
}

// Redact masks every registered secret in s.
func (l *Logger) Redact(s string) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return redact(s, l.secrets)
}

func redact(s string, secrets []string) string {
	for _, sec := range secrets {
		s = strings.ReplaceAll(s, sec, Masked)
	}
	return s
}

func (l *Logger) line(style, text string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	text = redact(text, l.secrets)
	for _, ln := range strings.Split(strings.TrimRight(text, "\n"), "\n") {
		if style == "" {
			fmt.Fprintln(l.w, ln)
		} else {
			fmt.Fprintf(l.w, "%s%s%s\n", style, ln, ansiReset)
		}
	}
}

// Printf writes a plain line.
func (l *Logger) Printf(format string, args ...any) { l.line("", fmt.Sprintf(format, args...)) }

// Noticef writes a highlighted line (the runner's "Using ..." style).
func (l *Logger) Noticef(format string, args ...any) {
	l.line(ansiBold+ansiGreen, fmt.Sprintf(format, args...))
}

// Warnf writes a WARNING line.
func (l *Logger) Warnf(format string, args ...any) {
	l.line(ansiYellow, "WARNING: "+fmt.Sprintf(format, args...))
}

// Errorf writes an ERROR line.
func (l *Logger) Errorf(format string, args ...any) {
	l.line(ansiRed, "ERROR: "+fmt.Sprintf(format, args...))
}

var sectionName = regexp.MustCompile(`[^a-z0-9_]+`)

// Section opens a collapsible section (collapsed unless expanded is true) and
// returns the function that closes it.
func (l *Logger) Section(name, header string, expanded bool) (end func()) {
	name = "ci_exec_" + sectionName.ReplaceAllString(strings.ToLower(name), "_")
	opts := "[collapsed=true]"
	if expanded {
		opts = ""
	}
	l.mu.Lock()
	fmt.Fprintf(l.w, "%ssection_start:%d:%s%s\r%s%s%s%s\n", clearLine, l.now().Unix(), name, opts, clearLine,
		ansiBold, redact(header, l.secrets), ansiReset)
	l.mu.Unlock()
	return func() {
		l.mu.Lock()
		defer l.mu.Unlock()
		fmt.Fprintf(l.w, "%ssection_end:%d:%s\r%s", clearLine, l.now().Unix(), name, clearLine)
	}
}

// Writer returns an io.Writer that redacts secrets from what passes through
// it line by line (for a runtime's output that ci-exec captures itself).
//
// It holds at most MaxLine bytes of a line: a longer line without a
// newline is copied on in pieces as it arrives (the line continues in the
// log), so a program printing 50 MB without a newline cannot grow
// ci-exec. A piece never ends inside a secret (see safeCut).
func (l *Logger) Writer() io.WriteCloser { return &lineWriter{l: l} }

// MaxLine is the most of one line a Writer holds.
const MaxLine = 64 << 10

type lineWriter struct {
	l   *Logger
	buf []byte
}

func (w *lineWriter) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		// Never append more than MaxLine at once, whatever the write's size.
		k := min(len(p), MaxLine)
		w.buf = append(w.buf, p[:k]...)
		p = p[k:]
		w.flush()
	}
	return n, nil
}

// flush writes the complete lines held, then, when what is left of the
// current line is longer than MaxLine, a piece of it.
func (w *lineWriter) flush() {
	rest := w.buf
	for {
		i := bytes.IndexByte(rest, '\n')
		if i < 0 {
			break
		}
		w.l.line("", string(rest[:i]))
		rest = rest[i+1:]
	}
	if len(rest) > MaxLine {
		rest = w.l.piece(rest)
	}
	// Keep the rest at the start of the buffer, so it does not grow.
	w.buf = append(w.buf[:0], rest...)
}

// Close flushes a final partial line.
func (w *lineWriter) Close() error {
	if len(w.buf) > 0 {
		w.l.line("", string(w.buf))
		w.buf = nil
	}
	return nil
}

// piece writes the start of an unfinished line, without a newline, and
// returns what it kept back.
func (l *Logger) piece(part []byte) []byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	cut, masked := safeCut(part, l.secrets)
	switch {
	case masked:
		// Everything before the cut is one chain of overlapping secrets.
		_, _ = io.WriteString(l.w, Masked)
	case cut > 0:
		_, _ = io.WriteString(l.w, redact(string(part[:cut]), l.secrets))
	}
	return part[cut:]
}

// safeCut picks where to split an unfinished line so that no secret is
// cut in two: each part is then redacted whole. It keeps back the last
// longest-secret-minus-one bytes (they may be the start of a secret that
// the next write completes) and moves the cut before any secret that
// would straddle it. masked is true in the one case where no such point
// exists before the kept bytes: every byte before them belongs to
// overlapping occurrences of secrets.
func safeCut(part []byte, secrets []string) (cut int, masked bool) {
	longest := 0
	for _, s := range secrets {
		longest = max(longest, len(s))
	}
	end := len(part) - max(longest-1, 0)
	if end <= 0 {
		return 0, false
	}
	cut = end
	for moved := true; moved && cut > 0; {
		moved = false
		for _, s := range secrets {
			// Any occurrence in this window straddles cut.
			lo, hi := max(0, cut-len(s)+1), min(len(part), cut+len(s)-1)
			if lo >= hi {
				continue
			}
			if j := bytes.Index(part[lo:hi], []byte(s)); j >= 0 {
				cut, moved = lo+j, true
			}
		}
	}
	if cut == 0 {
		return end, true
	}
	return cut, false
}

// QuoteArgv renders an argv as a copy-pasteable shell command line (for the
// log only; ci-exec never runs anything through a shell).
func QuoteArgv(argv []string) string {
	parts := make([]string, len(argv))
	for i, a := range argv {
		parts[i] = ShellQuote(a)
	}
	return strings.Join(parts, " ")
}

var plainWord = regexp.MustCompile(`^[A-Za-z0-9_@%+=:,./-]+$`)

// ShellQuote quotes s for a POSIX shell when it needs quoting.
func ShellQuote(s string) string {
	if s != "" && plainWord.MatchString(s) {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
