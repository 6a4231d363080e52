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
