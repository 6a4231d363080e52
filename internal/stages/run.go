package stages

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"

	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/mechanism"
)

// Plan is how one stage runs: a complete argv and environment, executed
// without a shell.
type Plan struct {
	// Where is "host" or the image the stage runs in (for the log).
	Where string
	Argv  []string
	Env   []string
	Dir   string
	// Runtime is set when the stage runs in a container: it tells the
	// runtime's own failures from the script's.
	Runtime mechanism.Runtime
	// UserArgs is true when the container command carries the user's own
	// runtime arguments.
	UserArgs bool
	// StartSignal is true when the command signals on fd 3 that the
	// stage's script began (outcome.StartCommand), which tells a runtime
	// failure from the script's exit code.
	StartSignal bool
}

var unsafeFileChars = regexp.MustCompile(`[^A-Za-z0-9_.-]+`)

// runStage copies the runner's script into the job's scripts dir (bound into
// containers at the same path, and on storage a compute node can read) and
// runs it.
func runStage(ctx context.Context, st *Stage, scriptPath, stage string) error {
	if err := st.Layout.Create(); err != nil {
		return failure.AsSystem(err)
	}
	script, err := copyScript(scriptPath, st.Layout.ScriptsDir, stage)
	if err != nil {
		return failure.AsSystem(err)
	}
	plan, err := planStage(ctx, st, stage, script)
	if err != nil {
		return err
	}
	if st.Cfg.IsBatch() && isBatchStage(stage) {
		return executeBatch(ctx, st, stage, plan)
	}
	return execute(ctx, st, stage, plan)
}

// copyScript copies src to <dir>/<stage>.bash, mode 0700.
func copyScript(src, dir, stage string) (string, error) {
	name := unsafeFileChars.ReplaceAllString(stage, "_")
	if name == "" || name == "." || name == ".." {
		name = "stage"
	}
	dst := filepath.Join(dir, name+".bash")
	in, err := os.Open(src)
	if err != nil {
		return "", fmt.Errorf("open the runner's script: %w", err)
	}
	defer in.Close()
	tmp, err := os.CreateTemp(dir, "."+name+"-*")
	if err != nil {
		return "", fmt.Errorf("copy the runner's script: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := io.Copy(tmp, in); err != nil {
		tmp.Close()
		return "", fmt.Errorf("copy the runner's script: %w", err)
	}
	if err := tmp.Chmod(0o700); err != nil {
		tmp.Close()
		return "", err
	}
	if err := tmp.Close(); err != nil {
		return "", err
	}
	if err := os.Rename(tmp.Name(), dst); err != nil {
		return "", fmt.Errorf("copy the runner's script: %w", err)
	}
	return dst, nil
}
