package stages

// The stage script's life in the job's scripts dir: copied from the
// runner with the job token moved off the helpers' command lines
// (internal/runnerscript), and removed or kept masked when the stage ends.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/ci-exec/ci-exec/internal/atomicfile"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/runnerscript"
)

// copyScript copies the runner's script to <scripts dir>/<stage>.bash, mode
// 0700, with the job token moved out of the helpers' command lines into
// their environment (package runnerscript). A script that would still put a
// token on a command line is refused: any user of the host can read argv.
func copyScript(ctx context.Context, st *Stage, src, stage string) (string, error) {
	in, err := readScript(st, src)
	if err != nil {
		return "", failure.AsSystem(fmt.Errorf("read the runner's script: %w", err))
	}
	res, err := runnerscript.Rewrite(in, st.Job.Tokens())
	if err != nil {
		return "", failure.Systemf("refusing to run the %s stage: %v", stage, err)
	}
	if res.Changed() {
		if err := runnerscript.Check(ctx, checkShell(st), res.Script, res.Bodies, st.Job.Secrets()); err != nil {
			return "", failure.Systemf("refusing to run the %s stage: %v", stage, err)
		}
	}
	dir := st.Layout.ScriptsDir
	dst := filepath.Join(dir, stageFileName(stage)+".bash")
	// Volatile: the copy is run at once and never after a crash, so it
	// needs no fsync on the run path.
	if err := atomicfile.Write(dst, res.Script, 0o700, atomicfile.Volatile); err != nil {
		return "", failure.AsSystem(fmt.Errorf("copy the runner's script: %w", err))
	}
	return dst, nil
}

// readScript reads the runner's script: in a downscoped stage from the
// descriptor the front opened (the runner's temp dir is its account's
// alone).
func readScript(st *Stage, src string) ([]byte, error) {
	if c := st.Inv.Child; c != nil {
		if c.Script == nil {
			return nil, fmt.Errorf("the privileged stage passed no script")
		}
		return io.ReadAll(c.Script)
	}
	return os.ReadFile(src)
}

// stageFileName is the stage's name as a file name in the scripts dir.
func stageFileName(stage string) string {
	name := unsafeFileChars.ReplaceAllString(stage, "_")
	if name == "" || name == "." || name == ".." {
		name = "stage"
	}
	return name
}

// checkShell is the bash that checks a rewritten script's syntax.
func checkShell(st *Stage) string {
	if p := st.Cfg.General.ShellPath; filepath.Base(p) == "bash" {
		return p
	}
	return "/bin/bash"
}

// retainedSuffixes are the per-stage files retain_logs keeps: the copied
// script, and the batch wrapper and output of a Slurm stage.
var retainedSuffixes = []string{".bash", ".sbatch", ".slurm.out"}

// retireScript runs when a stage is over. The copied script holds every
// job variable in clear: without retain_logs it goes at once (cleanup
// removes the rest of the dir); with retain_logs the stage's files stay
// with the job's secrets masked, mode 0600.
func retireScript(st *Stage, stage, script string) {
	if !st.Cfg.General.RetainLogs {
		if err := os.Remove(script); err != nil && !errors.Is(err, fs.ErrNotExist) {
			st.Log.Warnf("could not remove the copy of the %s script: %v", stage, err)
		}
		return
	}
	for _, suf := range retainedSuffixes {
		redactRetained(st, filepath.Join(st.Layout.ScriptsDir, stageFileName(stage)+suf))
	}
}

// redactRetainedDir masks the secrets in every kept stage file of the job:
// the cleanup stage's safety net for a stage that was killed before it
// could do it itself.
func redactRetainedDir(st *Stage) {
	ents, err := os.ReadDir(st.Layout.ScriptsDir)
	if err != nil {
		return
	}
	for _, e := range ents {
		for _, suf := range retainedSuffixes {
			if e.Type().IsRegular() && strings.HasSuffix(e.Name(), suf) {
				redactRetained(st, filepath.Join(st.Layout.ScriptsDir, e.Name()))
			}
		}
	}
}

// redactRetained masks the job's secrets in a kept file, or removes the
// file when that fails: a kept copy must never show a secret.
func redactRetained(st *Stage, path string) {
	err := runnerscript.RedactFile(path, st.Job.Secrets())
	if err == nil || errors.Is(err, fs.ErrNotExist) {
		return
	}
	st.Log.Warnf("retain_logs: could not mask the secrets in %s (%v); removing it", filepath.Base(path), err)
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		st.Log.Warnf("retain_logs: remove %s: %v", path, err)
	}
}
