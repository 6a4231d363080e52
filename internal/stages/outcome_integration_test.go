package stages_test

// A runtime's failure is a system failure and the script's exit code is
// the script's, however the script's stderr reads: with the real ch-run
// and apptainer, locally and under Slurm, a script that prints a
// runtime's own error line and then exits with the runtime's failure code
// is a script failure; a runtime that really fails before the script is
// not (see package outcome, the start signal).

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/ci-exec/ci-exec/internal/runnerdouble"
	"github.com/ci-exec/ci-exec/internal/testenv"
)

// lookalikes are scripts that end like a failed runtime.
var lookalikes = map[string]struct {
	script []string
	code   int
}{
	// A script that runs ch-run itself (set -e ends it with ch-run's 1).
	"ch-run error line, exit 1": {script: []string{
		`echo "ch-run[$$]: error: can't mkdir: /var/tmp/x: Read-only file system (ch_misc.c:409 30)" >&2`,
		`echo "ch-run[1]: error: the same, as pid 1 (ch_misc.c:409 30)" >&2`, `exit 1`}, code: 1},
	// Perl's die exits 255 after its message.
	"FATAL line, exit 255": {script: []string{
		`echo "FATAL:   container creation failed: mount /data->/data error" >&2`, `exit 255`}, code: 255},
}

func TestScriptPrintingRuntimeErrorsFailsAsScript(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		e := containerRunner(t, rt, u, "", `pull_policy = "if-not-present"`)
		for name, tc := range lookalikes {
			t.Run(name, func(t *testing.T) {
				j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
				j.Script = tc.script
				res := runJob(t, e.runner, j)
				assert.Equal(t, runnerdouble.ReasonScriptFailure, res.FailureReason)
				assert.Equal(t, tc.code, res.ExitCode, "the script's own exit code")
				assert.NotContains(t, res.Log, "could not run the build_script stage")
			})
		}
	})
}

func TestRuntimeFailureBeforeScriptIsSystemFailure(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		// The admin's own options make the runtime fail: no user
		// argument is involved, so it is the infrastructure's fault.
		e := containerRunner(t, rt, u, "", fmt.Sprintf("custom_options = [%q]", rt.failingArg))
		j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
		j.Script = []string{"echo must-not-run"}
		res := runJob(t, e.runner, j)
		assert.Equal(t, runnerdouble.ReasonRunnerSystemFailure, res.FailureReason)
		assert.Contains(t, res.Log, "could not run the build_script stage")
		assert.NotContains(t, res.Log, "\nmust-not-run")
	})
}

func TestBatchScriptPrintingRuntimeErrorsFailsAsScript(t *testing.T) {
	u := testenv.Unprivileged(t)
	for _, rt := range runtimes(t) {
		t.Run(rt.name, func(t *testing.T) {
			testenv.RequireBinary(t, rt.program)
			requireSlurmUp(t)
			e := containerRunner(t, rt, u, `executor = "slurm"`, `pull_policy = "if-not-present"`)
			for name, tc := range lookalikes {
				t.Run(name, func(t *testing.T) {
					j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
					j.ID = batchJobID.Add(1)
					j.Script = tc.script
					res := runJob(t, e.runner, j)
					assert.Equal(t, runnerdouble.ReasonScriptFailure, res.FailureReason)
					assert.Equal(t, tc.code, res.ExitCode, "the script's own exit code")
					assert.Contains(t, res.Log, "Submitted Slurm allocation")
					assert.NotContains(t, res.Log, "could not run the build_script stage")
					assertNoSlurmJob(t, j)
				})
			}
			t.Run("runtime fails on the node", func(t *testing.T) {
				e := containerRunner(t, rt, u, `executor = "slurm"`, fmt.Sprintf("pull_policy = \"if-not-present\"\ncustom_options = [%q]", rt.failingArg))
				j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
				j.ID = batchJobID.Add(1)
				j.Script = []string{"echo must-not-run"}
				res := runJob(t, e.runner, j)
				assert.Equal(t, runnerdouble.ReasonRunnerSystemFailure, res.FailureReason)
				assert.Contains(t, res.Log, "on its compute node")
				assert.NotContains(t, res.Log, "\nmust-not-run")
				assertNoSlurmJob(t, j)
			})
		})
	}
}
