package stages

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/job"
)

const siteDoc = `
[general]
data_dir = "/srv/ci"
[profiles.mpich]
description = "MPICH from the host"
binds = ["/opt/mpich:/opt/mpich:ro", "/scratch"]
env = ["MPI_HOME=/opt/mpich"]
scheduler_parameters = ["--partition=mpi"]
options = { apptainer = ["--env=FROM_PROFILE=1"] }
[profiles.gpu]
gpu = true
[gpu]
enabled = true
gres = "gpu:a100:1"
[limits]
default_cpus = 2
max_cpus = 8
default_memory = "1G"
max_memory = "16G"
max_tmp = "10G"
`

func siteConfig(t *testing.T) *config.Config {
	t.Helper()
	cfg, err := config.Parse(siteDoc, config.UserInfo{Name: "bob", Home: "/home/bob"})
	require.NoError(t, err)
	return cfg
}

func TestSiteProfiles(t *testing.T) {
	cfg := siteConfig(t)
	js, err := siteFor(cfg, map[string]string{varProfile: "mpich"})
	require.NoError(t, err)
	assert.Equal(t, "mpich", js.Name)
	assert.Len(t, js.Binds, 2)
	assert.True(t, js.Binds[0].ReadOnly)
	assert.Equal(t, "/scratch", js.Binds[1].Dst)
	assert.Equal(t, []string{"A=1", "MPI_HOME=/opt/mpich"}, js.profileEnv([]string{"A=1", "MPI_HOME=/usr"}), "the profile's env wins")
	assert.Equal(t, []string{"Using the site profile mpich: MPICH from the host", "Resource limits: 2 CPUs, 1G memory"}, js.Describe())

	_, err = siteFor(cfg, map[string]string{varProfile: "mpi"})
	require.Error(t, err)
	assert.Equal(t, failure.User, failure.ClassOf(err), "an unknown profile is the user's to fix, never retried")
	assert.Contains(t, err.Error(), `CI_EXEC_PROFILE="mpi" names no profile: this runner has gpu, mpich`)
}

func TestSiteLimits(t *testing.T) {
	cfg := siteConfig(t)
	cases := map[string]struct {
		vars map[string]string
		want string // error
		cpus int
		mem  int64
	}{
		"defaults":        {vars: nil, cpus: 2, mem: 1 << 30},
		"asked":           {vars: map[string]string{varCPUs: "8", varMemory: "4G"}, cpus: 8, mem: 4 << 30},
		"memory cap":      {vars: map[string]string{varMemory: "32G"}, want: "CI_EXEC_MEMORY=32G is above this runner's limit of 16G (limits.max_memory)"},
		"cpu cap":         {vars: map[string]string{varCPUs: "9"}, want: "above this runner's limit of 8 CPUs (limits.max_cpus)"},
		"tmp cap":         {vars: map[string]string{varTmp: "11G"}, want: "limits.max_tmp"},
		"bad cpus":        {vars: map[string]string{varCPUs: "two"}, want: "not a whole number"},
		"bad memory":      {vars: map[string]string{varMemory: "lots"}, want: "not a size"},
		"gpu not per job": {vars: map[string]string{varGPU: "1"}, want: "does not let jobs ask for a GPU"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			js, err := siteFor(cfg, c.vars)
			if c.want != "" {
				require.Error(t, err)
				assert.Equal(t, failure.User, failure.ClassOf(err))
				assert.Contains(t, err.Error(), c.want)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, c.cpus, js.Limits.CPUs)
			assert.Equal(t, c.mem, js.Limits.MemoryBytes)
		})
	}
}

func TestSiteSchedulerOptions(t *testing.T) {
	cfg := siteConfig(t)
	js, err := siteFor(cfg, map[string]string{varProfile: "mpich", varCPUs: "4", varMemory: "1500M", varTmp: "2G"})
	require.NoError(t, err)
	profile, enforced := js.schedulerOptions(cfg)
	assert.Equal(t, []string{"--partition=mpi"}, profile)
	assert.Equal(t, []string{"--cpus-per-task=4", "--mem=1500M", "--tmp=2048M"}, enforced)

	js, err = siteFor(cfg, map[string]string{varProfile: "gpu"})
	require.NoError(t, err)
	_, enforced = js.schedulerOptions(cfg)
	assert.Equal(t, []string{"--cpus-per-task=2", "--mem=1024M", "--gres=gpu:a100:1"}, enforced)
}

func TestSiteSchedulerArgsOrder(t *testing.T) {
	cfg := siteConfig(t)
	st := &Stage{Cfg: cfg, Job: &job.Job{Vars: map[string]string{varProfile: "mpich", varMemory: "2G"}}}
	args, err := siteSchedulerArgs(st, []string{"--time=10", "--mem=100G"})
	require.NoError(t, err)
	assert.Equal(t, []string{"--partition=mpi", "--time=10", "--mem=100G", "--cpus-per-task=2", "--mem=2048M"}, args,
		"the profile's parameters before the user's (which may override them), the limits after (which sbatch keeps)")

	cfg.Profiles["bad"] = config.Profile{SchedulerParameters: []string{"--output=/tmp/x"}}
	st.Job.Vars = map[string]string{varProfile: "bad"}
	_, err = siteSchedulerArgs(st, nil)
	require.Error(t, err)
	assert.Equal(t, failure.System, failure.ClassOf(err), "the admin's profile is the admin's to fix")
	assert.Contains(t, err.Error(), "profiles.bad.scheduler_parameters: --output is set by ci-exec itself")
}
