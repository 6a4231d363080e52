package proc

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestOutputSeparatesAndCapsStreams(t *testing.T) {
	// 3 MiB on stdout: more than OutputLimit, and more than a pipe holds,
	// so the program would block forever if the rest were not drained.
	out, errb, res, err := Output(context.Background(), Cmd{
		Argv: bash(`head -c 3145728 /dev/zero | tr '\0' x; echo oops >&2; exit 3`),
		Env:  []string{"PATH=/usr/bin:/bin"},
	})
	require.NoError(t, err)
	assert.Equal(t, 3, res.ExitCode)
	assert.Len(t, out, OutputLimit)
	assert.Equal(t, strings.Repeat("x", 16), string(out[:16]))
	assert.Equal(t, "oops\n", string(errb))
}

func TestOutputStopsWithTheContext(t *testing.T) {
	dir := t.TempDir()
	started := filepath.Join(dir, "started")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan Result, 1)
	go func() {
		_, _, res, _ := Output(ctx, Cmd{Argv: bash("echo > " + started + "; exec sleep 600"), Grace: time.Second})
		done <- res
	}()
	// The program has started when it wrote its file: only then cancel,
	// so the test shows a running helper being stopped.
	require.Eventually(t, func() bool { _, err := os.Stat(started); return err == nil }, 10*time.Second, 5*time.Millisecond)
	cancel()
	res := <-done
	assert.True(t, res.Stopped)
	assert.True(t, res.Signaled)
}

func TestOutputStartError(t *testing.T) {
	_, _, _, err := Output(context.Background(), Cmd{Argv: []string{"/nonexistent/sbatch"}})
	var se *StartError
	assert.ErrorAs(t, err, &se)
}
