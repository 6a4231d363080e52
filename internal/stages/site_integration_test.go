package stages_test

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/mechanism/kit"
	"github.com/ci-exec/ci-exec/internal/runnerdouble"
	"github.com/ci-exec/ci-exec/internal/testenv"
)

// TestSiteProfileApplies: a job picks a profile with CI_EXEC_PROFILE; its
// bind and variable are visible inside the container, and the log says
// which profile applied. An unknown profile fails without retry and names
// the profiles that exist; a memory request above the cap is refused with
// the cap in the message.
func TestSiteProfileApplies(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		dir := testenv.PrivateDir(t, u)
		site := filepath.Join(dir, "site")
		require.NoError(t, os.Mkdir(site, 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(site, "marker"), []byte("from-the-profile-bind\n"), 0o644))
		table := fmt.Sprintf(`pull_policy = "if-not-present"
[profiles.site]
description = "the site's test setup"
binds = ["%s:/opt/site"]
env = ["SITE_VAR=from-the-profile"]
[profiles.other]
[limits]
max_memory = "2G"`, site)
		e := containerRunner(t, rt, u, "", table)
		j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
		j.Variables = map[string]string{"CI_EXEC_PROFILE": "site"}
		j.Script = []string{`cat /opt/site/marker`, `echo "var=$SITE_VAR"`}
		res := runJob(t, e.runner, j)
		require.True(t, res.Succeeded(), res.Error)
		assert.Contains(t, res.Log, "Using the site profile site: the site's test setup")
		assert.Contains(t, res.Log, "\nfrom-the-profile-bind\n")
		assert.Contains(t, res.Log, "\nvar=from-the-profile\n")

		j.Variables = map[string]string{"CI_EXEC_PROFILE": "nope"}
		res = runJob(t, e.runner, j)
		assertRefusedBeforePull(t, res, `CI_EXEC_PROFILE="nope" names no profile: this runner has other, site`)

		// Within the cap: the job runs, under the limit where the runtime
		// can enforce it on this host, else with a warning that says so.
		j.Variables = map[string]string{"CI_EXEC_PROFILE": "site", "CI_EXEC_MEMORY": "1G", "CI_EXEC_CPUS": "1"}
		res = runJob(t, e.runner, j)
		require.True(t, res.Succeeded(), res.Error)
		assert.Contains(t, res.Log, "Resource limits: 1 CPUs, 1G memory")
		if ok, _ := kit.CgroupLimits(u.UID); !ok || rt.name == "charliecloud" {
			assert.Contains(t, res.Log, "WARNING: the CPU and memory limits cannot be enforced on this host")
		} else {
			assert.Contains(t, res.Log, "--memory=1073741824")
		}

		j.Variables = map[string]string{"CI_EXEC_MEMORY": "3G"}
		res = runJob(t, e.runner, j)
		assertRefusedBeforePull(t, res, "CI_EXEC_MEMORY=3G is above this runner's limit of 2G (limits.max_memory)")
	})
}

// TestBatchSiteOptions: with the Slurm executor a profile's
// scheduler_parameters and the job's limits reach sbatch (the limits after
// the user's own parameters, so they hold), and the job sees them.
func TestBatchSiteOptions(t *testing.T) {
	u := testenv.Unprivileged(t)
	part := testenv.Fact(t, "CI_EXEC_TEST_SLURM_PARTITION")
	c, _ := slurmRunner(t, u, "", fmt.Sprintf("[profiles.p]\nscheduler_parameters = [\"--partition=%s\"]\n[limits]\nmax_memory = \"1G\"\nmax_cpus = 1", part))
	j := batchJob()
	j.Variables = map[string]string{"CI_EXEC_PROFILE": "p", "CI_EXEC_MEMORY": "64M", "CI_EXEC_CPUS": "1", "SCHEDULER_PARAMETERS": "--mem=900M"}
	j.Script = []string{`echo "slurm partition=$SLURM_JOB_PARTITION mem=$SLURM_MEM_PER_NODE cpus=$SLURM_CPUS_PER_TASK"`}
	res := runJob(t, c, j)
	require.True(t, res.Succeeded(), res.Error)
	// The user's parameters between them are masked in the log (a
	// variable's value), hence two checks.
	assert.Contains(t, res.Log, fmt.Sprintf("sbatch --no-requeue --export=ALL --partition=%s ", part))
	assert.Contains(t, res.Log, " --cpus-per-task=1 --mem=64M --comment=")
	assert.Contains(t, res.Log, fmt.Sprintf("slurm partition=%s mem=64 cpus=1", part), "sbatch kept the limit, not the user's --mem")
	assertNoSlurmJob(t, j)
}

// TestSiteHostJob: a job on the host gets its profile's env, and is told
// that its limits are not enforced there; services need a container.
func TestSiteHostJob(t *testing.T) {
	u := testenv.Unprivileged(t)
	c, _ := hostRunner(t, u, "[profiles.p]\nenv = [\"SITE_VAR=on-the-host\"]\n[limits]\ndefault_cpus = 1\n")
	j := runnerdouble.Job{Variables: map[string]string{"CI_EXEC_PROFILE": "p"}, Script: []string{`echo "var=$SITE_VAR"`}}
	res := runJob(t, c, j)
	require.True(t, res.Succeeded(), res.Error)
	assert.Contains(t, res.Log, "\nvar=on-the-host\n")
	assert.Contains(t, res.Log, "WARNING: the job's resource limits cannot be enforced for a job that runs on the host")

	j.Services = []runnerdouble.Service{{Name: "docker.io/library/postgres:16"}}
	res = runJob(t, c, j)
	assertRefusedBeforePull(t, res, "services: this runner runs jobs on the host, without a container runtime")
}
