package outcome

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestStartCommandGolden(t *testing.T) {
	assert.Equal(t, []string{"/bin/bash", "-c", `printf x 2>/dev/null >&3; exec "$@" 3>&-`, "/bin/bash", "/bin/bash", "--noprofile", "/s/build_script.bash"},
		StartCommand([]string{"/bin/bash", "--noprofile", "/s/build_script.bash"}))
}

// run runs StartCommand(argv) with a StartFile as fd 3 (or none) and
// returns its output, exit code and whether it signalled its start.
func run(t *testing.T, withFD bool, argv ...string) (string, int, bool) {
	t.Helper()
	sf, err := NewStartFile()
	require.NoError(t, err)
	defer sf.Close()
	cmd := exec.Command(StartCommand(argv)[0], StartCommand(argv)[1:]...)
	if withFD {
		cmd.ExtraFiles = []*os.File{sf.File()}
	}
	out, err := cmd.CombinedOutput()
	rc := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		rc = ee.ExitCode()
	} else {
		require.NoError(t, err)
	}
	return string(out), rc, sf.Started()
}

func TestStartSignal(t *testing.T) {
	for _, sh := range []string{"/bin/sh", "/bin/bash"} {
		t.Run(sh, func(t *testing.T) {
			dir := t.TempDir()
			script := filepath.Join(dir, "script")
			// The script reports its arguments and whether it sees fd 3.
			require.NoError(t, os.WriteFile(script, []byte(`printf '[%s]\n' "$0" "$@"; if (: >&3) 2>/dev/null; then echo fd3-open; fi; exit 7`+"\n"), 0o600))

			out, rc, started := run(t, true, sh, script, "a b", "$(touch x)", "")
			assert.True(t, started, "the shell signalled its start")
			assert.Equal(t, 7, rc, "the script's exit code passes through")
			assert.Equal(t, "["+script+"]\n[a b]\n[$(touch x)]\n[]\n", out, "words reach the script verbatim, fd 3 is closed for it")
			assert.NoFileExists(t, filepath.Join(dir, "x"))

			out, rc, _ = run(t, false, sh, script)
			assert.Equal(t, 7, rc)
			assert.Equal(t, "["+script+"]\n", out, "without an fd 3 nothing is printed about it")
		})
	}
}

func TestNoStartSignalWhenTheShellCannotRunTheCommand(t *testing.T) {
	// The wrapper's exec fails (as for a command that cannot start): the
	// signal was written by the wrapper shell, so a start means "the
	// shell ran", and the exit is the shell's own 127.
	out, rc, started := run(t, true, "/bin/sh", "-c", "exit 0")
	assert.Equal(t, 0, rc, out)
	assert.True(t, started)

	// A missing shell never runs: no signal.
	sf, err := NewStartFile()
	require.NoError(t, err)
	defer sf.Close()
	cmd := exec.Command("/nonexistent/sh", StartCommand([]string{"/nonexistent/sh", "x"})[1:]...)
	cmd.ExtraFiles = []*os.File{sf.File()}
	assert.Error(t, cmd.Run())
	assert.False(t, sf.Started())
	assert.True(t, strings.HasPrefix(startProgram, "printf x 2>/dev/null >&3;"), "the write goes first")
}
