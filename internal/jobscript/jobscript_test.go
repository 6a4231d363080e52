package jobscript

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/testenv"
)

// The user steps' script, run by bash and by busybox sh as the runner's
// scripts are: every command echoed as "$ command" before its output, a
// multi-line command echoed by its first line, variables exported, the
// first failing command ending the script with its code.
func TestUserScriptRuns(t *testing.T) {
	dir := t.TempDir()
	c := Context{
		ProjectDir: dir,
		Vars:       []Variable{{Key: "GREETING", Value: "it's a \"test\" $HOME"}},
		Steps: []Step{{Name: "script", Script: []string{
			`echo "$GREETING"`,
			"if true; then\n  echo multi\nfi",
			"(exit 5)",
			"echo never",
		}}},
	}
	script, ok, err := c.StageScript("step_script", "bash")
	require.NoError(t, err)
	require.True(t, ok)
	p := filepath.Join(t.TempDir(), "script")
	require.NoError(t, os.WriteFile(p, []byte(script), 0o700))
	for _, sh := range []string{"bash", "busybox"} {
		sh := testenv.RequireBinary(t, sh)
		args := []string{p}
		if filepath.Base(sh) == "busybox" {
			args = []string{"sh", p}
		}
		cmd := exec.Command(sh, args...)
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		require.ErrorAs(t, err, &ee, "%s: %s", sh, out)
		assert.Equal(t, 5, ee.ExitCode(), sh)
		want := strings.Join([]string{
			`$ echo "$GREETING"`, `it's a "test" $HOME`,
			"$ if true; then # collapsed multi-line command", "multi",
			"$ (exit 5)", "",
		}, "\n")
		assert.Equal(t, want, string(out), sh)
	}
}

func TestStagesWithNothingToDo(t *testing.T) {
	for _, stage := range []string{"after_script", "restore_cache", "archive_cache", "upload_artifacts_on_success", "download_artifacts", "step_release"} {
		_, ok, err := Context{Steps: []Step{{Name: "script", Script: []string{"true"}}}}.StageScript(stage, "bash")
		require.NoError(t, err)
		assert.False(t, ok, stage)
	}
}
