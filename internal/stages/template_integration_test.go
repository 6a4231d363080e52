package stages_test

// The template runtime's own contract through the whole binary: a
// template that cannot serve the configuration is refused before any job
// runs, with one line that names the key (the shared suites run the
// working Podman template: podmanTemplateFixture).

import (
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/runnerdouble"
	"github.com/ci-exec/ci-exec/internal/testenv"
)

func TestTemplateHalfWiredIsRefused(t *testing.T) {
	u := testenv.Unprivileged(t)
	testenv.RequireBinary(t, "podman")
	rt := podmanTemplateFixture
	for _, c := range []struct{ name, general, table, want string }{
		{"setup under slurm", `executor = "slurm"`, `setup = ["podman", "create", "--name", "ci-exec-{job_key}", "{image}"]`,
			`runtimes.podman.setup makes per-job state on the host where prepare runs, but executor = "slurm" runs stages on compute nodes`},
		{"volumes without a bind fragment", "", "user_volume_variable = \"CI_VOLUMES\"\nvolume_prefixes = [\"/scratch\"]\nbind = []",
			"runtimes.podman.user_volume_variable needs a bind fragment"},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := containerRunner(t, rt, u, c.general, "")
			// Replace keys the shipped template sets rather than repeat
			// them (TOML refuses a key twice).
			cfgPath := e.runner.ConfigArgs[1]
			b, err := os.ReadFile(cfgPath)
			require.NoError(t, err)
			doc := string(b)
			if strings.HasPrefix(c.table, "user_volume") {
				doc = strings.Replace(doc, "bind = [\"--volume\", \"{src}:{dst}\"]\n", "", 1)
				c.table = strings.TrimSuffix(c.table, "\nbind = []")
			}
			require.NoError(t, os.WriteFile(cfgPath, []byte(doc+"\n"+c.table+"\n"), 0o644))
			j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
			j.Script = []string{"echo template-job-ran-$((1+1))"}
			res := runJob(t, e.runner, j)
			assert.Equal(t, runnerdouble.ReasonRunnerSystemFailure, res.FailureReason, "a broken template is the admin's to fix")
			assert.Contains(t, res.Log, c.want)
			assert.NotContains(t, res.Log, "template-job-ran-2")
			assert.NotContains(t, res.Log, "template:podman pull ", "nothing runs before the configuration is valid")
		})
	}
}
