package kit

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestRunToolProgress(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "dl")
	require.NoError(t, os.Mkdir(out, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(out, "old"), make([]byte, 5000), 0o644), "present before: not counted")
	fifo := filepath.Join(dir, "release")
	require.NoError(t, syscall.Mkfifo(fifo, 0o600))
	// The "tool" fetches three 1 KiB layers, then waits until the test
	// has seen its progress lines.
	script := fmt.Sprintf(`for i in 1 2 3; do head -c 1024 /dev/zero > %[1]s/layer$i; done; read x < %[2]s`, out, fifo)
	lines := make(chan string, 100)
	var res ToolResult
	var err error
	done := make(chan struct{})
	go func() {
		defer close(done)
		res, err = RunTool(context.Background(), Tool{
			Argv: []string{"/bin/sh", "-c", script}, Env: []string{"PATH=/usr/bin:/bin"}, Grace: time.Second,
			Progress: &Progress{What: "test pull", Dirs: []string{out}, First: 10 * time.Millisecond, Every: 10 * time.Millisecond,
				Logf: func(format string, args ...any) { lines <- fmt.Sprintf(format, args...) }},
		})
	}()
	var seen []string
	for {
		l := <-lines
		// The layers may still be being written at the first lines.
		seen = append(seen, l)
		if len(seen) >= 2 && regexp.MustCompile(`^test pull: 3\.0 KiB in 3 new file\(s\) after [0-9]+s \([0-9.]+ [KMG]?i?B/s\)$`).MatchString(l) {
			break
		}
	}
	f, ferr := os.OpenFile(fifo, os.O_WRONLY, 0)
	require.NoError(t, ferr)
	_, _ = f.WriteString("go\n")
	f.Close()
	<-done
	require.NoError(t, err)
	assert.Equal(t, 0, res.ExitCode)
	for _, l := range seen {
		assert.Regexp(t, `^test pull: [0-9.]+ (B|KiB) in [0-3] new file\(s\) after [0-9]+s \(`, l)
	}
}

func TestRunToolQuickHasNoProgress(t *testing.T) {
	var lines []string
	_, err := RunTool(context.Background(), Tool{
		Argv: []string{"/bin/true"}, Env: []string{}, Grace: time.Second,
		Progress: &Progress{What: "quick", Dirs: []string{t.TempDir()}, First: time.Hour,
			Logf: func(format string, args ...any) { lines = append(lines, fmt.Sprintf(format, args...)) }},
	})
	require.NoError(t, err)
	assert.Empty(t, lines, "a tool that ends before First prints no progress")
}
