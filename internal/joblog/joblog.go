// Package joblog writes ci-exec's own lines to the job log: plain notices,
// warnings and errors, GitLab's collapsible sections, and redaction of
// secrets, so that nothing ci-exec prints can leak a token even when it
// echoes a command line or a runtime's error output.
package joblog

import (
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
func (l *Logger) Writer() io.WriteCloser { return &lineWriter{l: l} }

type lineWriter struct {
	l   *Logger
	buf []byte
}

func (w *lineWriter) Write(p []byte) (int, error) {
	w.buf = append(w.buf, p...)
	for {
		i := strings.IndexByte(string(w.buf), '\n')
		if i < 0 {
			break
		}
		w.l.line("", string(w.buf[:i]))
		w.buf = w.buf[i+1:]
	}
	return len(p), nil
}

// Close flushes a final partial line.
func (w *lineWriter) Close() error {
	if len(w.buf) > 0 {
		w.l.line("", string(w.buf))
		w.buf = nil
	}
	return nil
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
