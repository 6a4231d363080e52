package joblog

import (
	"bytes"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

func TestRedaction(t *testing.T) {
	var buf bytes.Buffer
	l := New(&buf)
	l.AddSecrets("short", "glcbt-64_abcdefgh", "glcbt-64_abcdefgh-longer")
	l.Printf("token glcbt-64_abcdefgh-longer and glcbt-64_abcdefgh and short")
	l.Errorf("pull failed: password=%s", "glcbt-64_abcdefgh")
	w := l.Writer()
	fmt.Fprint(w, "partial glcbt-64_")
	fmt.Fprint(w, "abcdefgh line\nlast without newline glcbt-64_abcdefgh")
	w.Close()
	out := buf.String()
	assert.NotContains(t, out, "abcdefgh")
	assert.Contains(t, out, "token [MASKED] and [MASKED] and short", "short values are not masked")
	assert.Contains(t, out, "partial [MASKED] line\n", "a secret split across writes is still masked")
	assert.Contains(t, out, "last without newline [MASKED]\n")
	assert.Contains(t, out, "ERROR: pull failed: password=[MASKED]")
	assert.Equal(t, "x [MASKED]", l.Redact("x glcbt-64_abcdefgh"))
}

func TestSection(t *testing.T) {
	var buf bytes.Buffer
	l := New(&buf)
	l.now = func() time.Time { return time.Unix(1700000000, 0) }
	end := l.Section("Container Command!", "ch-run ...", false)
	l.Printf("inside")
	end()
	out := buf.String()
	assert.True(t, strings.HasPrefix(out, "\033[0Ksection_start:1700000000:ci_exec_container_command_[collapsed=true]\r\033[0K"), "%q", out)
	assert.Contains(t, out, "inside\n")
	assert.True(t, strings.HasSuffix(out, "section_end:1700000000:ci_exec_container_command_\r\033[0K"), "%q", out)
}

func TestQuoteArgv(t *testing.T) {
	assert.Equal(t, `ch-run -b /a/b --set-env=X=1 '' 'it'\''s' '$(id)' 'a b;c'`,
		QuoteArgv([]string{"ch-run", "-b", "/a/b", "--set-env=X=1", "", "it's", "$(id)", "a b;c"}))
}

func TestWriterLongLineIsCopiedInBoundedPieces(t *testing.T) {
	for name, writeSize := range map[string]int{"1 MiB writes": 1 << 20, "one 20 MiB write": 20 << 20} {
		t.Run(name, func(t *testing.T) {
			var out countingWriter
			l := New(&out)
			l.AddSecrets("glcbt-64_abcdefgh")
			w := l.Writer()
			lw := w.(*lineWriter)
			chunk := []byte(strings.Repeat("x", writeSize))
			for written := 0; written < 20<<20; written += writeSize {
				_, err := w.Write(chunk)
				assert.NoError(t, err)
				assert.LessOrEqual(t, cap(lw.buf), 3*(64<<10), "the unfinished line is not held whole")
			}
			assert.Greater(t, out.n, int64(20<<20-2*MaxLine), "the line is copied while it is still open")
			_, _ = w.Write([]byte("\n"))
			assert.Equal(t, int64(20<<20+1), out.n, "every byte arrives, once")
			assert.Equal(t, 0, out.newlines-1, "no newline is added inside the line")
		})
	}
}

func TestWriterPiecesNeverSplitASecret(t *testing.T) {
	const secret = "glcbt-64_SECRETtoken"
	// A piece is cut when the held line grows past MaxLine; the first
	// write below ends d bytes before the end of a secret that starts k
	// bytes after MaxLine, so the cut meets the secret at every offset,
	// complete or not yet complete.
	for k := -2 * len(secret); k < 2*len(secret); k++ {
		for d := 0; d <= len(secret); d++ {
			var buf bytes.Buffer
			l := New(&buf)
			l.AddSecrets(secret, "short-secret")
			w := l.Writer()
			line := strings.Repeat("y", MaxLine+k) + secret + strings.Repeat("z", MaxLine+10) + secret + strings.Repeat("w", 2*MaxLine)
			first := MaxLine + k + len(secret) - d
			_, _ = w.Write([]byte(line[:first]))
			_, _ = w.Write([]byte(line[first:]))
			w.Close()
			out := buf.String()
			if !assert.Equal(t, strings.ReplaceAll(line, secret, Masked)+"\n", out, "k %d, d %d", k, d) {
				return
			}
		}
	}
}

func TestWriterSelfOverlappingSecret(t *testing.T) {
	// A secret that overlaps itself, in a run longer than a piece.
	const secret = "aaaaaaaa"
	var buf bytes.Buffer
	l := New(&buf)
	l.AddSecrets(secret)
	w := l.Writer()
	_, _ = w.Write([]byte("start " + strings.Repeat("a", 5*MaxLine)))
	_, _ = w.Write([]byte(" end\n"))
	w.Close()
	assert.NotContains(t, buf.String(), secret)
	assert.True(t, strings.HasPrefix(buf.String(), "start "), buf.String()[:20])
	assert.True(t, strings.HasSuffix(buf.String(), " end\n"))
}

// countingWriter counts bytes and newlines.
type countingWriter struct {
	n        int64
	newlines int
}

func (c *countingWriter) Write(p []byte) (int, error) {
	c.n += int64(len(p))
	c.newlines += bytes.Count(p, []byte("\n"))
	return len(p), nil
}
