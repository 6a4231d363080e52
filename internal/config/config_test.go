package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var bob = UserInfo{Name: "bob", Home: "/home/bob"}

func TestParseMinimal(t *testing.T) {
	cfg, err := Parse("[general]\ndata_dir = \"$HOME/.ci-exec\"\n", bob)
	require.NoError(t, err)
	g := cfg.General
	assert.Equal(t, "/home/bob/.ci-exec", g.DataDir)
	assert.Equal(t, ExecutorShell, g.Executor)
	assert.Equal(t, MechanismNone, g.RunMechanism)
	assert.Equal(t, DefaultKillTimeout, g.KillTimeout.Duration)
	assert.Equal(t, DefaultPassEnv, g.PassEnv)
	assert.Nil(t, cfg.Mechanism())
	assert.False(t, cfg.IsBatch())
	assert.Equal(t, []string{"SCHEDULER_PARAMETERS"}, cfg.Batch.ArgumentsVariable)
	assert.Equal(t, AllocatePrepare, cfg.Batch.Allocate)
	assert.Equal(t, DefaultIdleLimit, cfg.Batch.IdleLimit.Duration)
	assert.Equal(t, PullAlways, g.Charliecloud.PullPolicy)
	assert.Equal(t, PullAlways, g.Apptainer.RunnerPullPolicy)
}

func TestParseFullExample(t *testing.T) {
	// The shipped example must always load: admins copy it.
	b, err := os.ReadFile(filepath.Join("..", "..", "configs", "ci-exec.toml"))
	if os.IsNotExist(err) {
		t.Fatal("configs/ci-exec.toml is missing")
	}
	require.NoError(t, err)
	cfg, err := Parse(string(b), bob)
	require.NoError(t, err)
	assert.NotEmpty(t, cfg.General.DataDir)
}

func TestExpansion(t *testing.T) {
	cases := map[string]struct {
		in, want, err string
	}{
		"home":        {in: "$HOME/ci", want: "/home/bob/ci"},
		"braces":      {in: "/srv/ci/${USER}", want: "/srv/ci/bob"},
		"both":        {in: "/scratch/${USER}/$HOME", want: "/scratch/bob//home/bob"},
		"other var":   {in: "$SCRATCH/ci", err: "only $HOME and $USER may be used, not $SCRATCH"},
		"stray":       {in: "/srv/$/x", err: "stray '$'"},
		"plain":       {in: "/srv/ci", want: "/srv/ci"},
		"user suffix": {in: "/srv/$USERNAME", err: "not $USERNAME"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			got, err := ExpandUserPath("general.data_dir", c.in, bob)
			if c.err != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), c.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, c.want, got)
		})
	}
}

func TestParseErrors(t *testing.T) {
	cases := map[string]struct {
		doc  string
		want []string
	}{
		"missing data_dir":      {"[general]\n", []string{"general.data_dir is required"}},
		"empty file":            {"", []string{"general.data_dir is required"}},
		"relative data_dir":     {"[general]\ndata_dir = \"ci\"\n", []string{"absolute path"}},
		"root data_dir":         {"[general]\ndata_dir = \"/\"\n", []string{"must not be /"}},
		"typo top":              {"[general]\ndata_dir = \"/x\"\nexecuter = \"shell\"\n", []string{`unknown key "general.executer"`}},
		"typo table":            {"[genral]\ndata_dir = \"/x\"\n", []string{`unknown key "genral"`}},
		"typo nested":           {"[general]\ndata_dir = \"/x\"\n[general.charliecloud]\nimage_alowlist = [\"a\"]\n", []string{`unknown key "general.charliecloud.image_alowlist"`}},
		"wrong type string":     {"[general]\ndata_dir = 5\n", []string{"data_dir", "incompatible types"}},
		"wrong type bool":       {"[general]\ndata_dir = \"/x\"\nforce_mechanism = \"yes\"\n", []string{"force_mechanism", "incompatible types"}},
		"wrong type array":      {"[general]\ndata_dir = \"/x\"\n[general.charliecloud]\nimage_allowlist = \"a\"\n", []string{"image_allowlist"}},
		"bad duration":          {"[general]\ndata_dir = \"/x\"\nkill_timeout = \"soon\"\n", []string{"not a duration", "line 3"}},
		"bad syntax":            {"[general\n", []string{"line ", "end table name"}},
		"bad executor":          {"[general]\ndata_dir = \"/x\"\nexecutor = \"pbs\"\n", []string{`general.executor must be "shell" or "slurm", got "pbs"`}},
		"bad mechanism":         {"[general]\ndata_dir = \"/x\"\nrun_mechanism = \"docker\"\n", []string{"run_mechanism must be"}},
		"force without mech":    {"[general]\ndata_dir = \"/x\"\nforce_mechanism = true\n", []string{"force_mechanism needs general.run_mechanism"}},
		"bad regex":             {"[general]\ndata_dir = \"/x\"\n[general.charliecloud]\nimage_allowlist = [\"(\"]\n", []string{"image_allowlist[0]: invalid regular expression"}},
		"bad pull policy":       {"[general]\ndata_dir = \"/x\"\n[general.apptainer]\npull_policy = \"sometimes\"\n", []string{"general.apptainer.pull_policy must be"}},
		"relative shell":        {"[general]\ndata_dir = \"/x\"\nshell_path = \"bash\"\n", []string{"shell_path must be an absolute path"}},
		"bad pass_env":          {"[general]\ndata_dir = \"/x\"\npass_env = [\"A=B\"]\n", []string{"pass_env"}},
		"bad env_vars":          {"[general]\ndata_dir = \"/x\"\nenv_vars = [\"NOVALUE\"]\n", []string{"env_vars"}},
		"bad volume prefix":     {"[general]\ndata_dir = \"/x\"\n[general.charliecloud]\nvolume_prefixes = [\"/\"]\n", []string{"volume_prefixes[0]"}},
		"bad batch flag":        {"[general]\ndata_dir = \"/x\"\n[batch]\ndenied_flags = [\"wrap\"]\n", []string{"not a flag"}},
		"bad allocate":          {"[general]\ndata_dir = \"/x\"\n[batch]\nallocate = \"job\"\n", []string{`batch.allocate must be "prepare" or "stage", got "job"`}},
		"short idle_limit":      {"[general]\ndata_dir = \"/x\"\n[batch]\nidle_limit = \"10ms\"\n", []string{"batch.idle_limit must be at least 1s"}},
		"bad data_dir variable": {"[general]\ndata_dir = \"$SCRATCH/ci\"\n", []string{"only $HOME and $USER"}},
		"several at once":       {"[general]\nexecutor = \"pbs\"\n", []string{"data_dir is required", "executor must be"}},
		"profile bad bind":      {"[general]\ndata_dir = \"/x\"\n[profiles.a]\nbinds = [\"opt:/opt\"]\n", []string{"profiles.a.binds[0]: \"opt:/opt\": both paths must be absolute"}},
		"profile bad env":       {"[general]\ndata_dir = \"/x\"\n[profiles.a]\nenv = [\"NOVALUE\"]\n", []string{"profiles.a.env"}},
		"profile bad runtime":   {"[general]\ndata_dir = \"/x\"\n[profiles.a]\noptions = { docker = [\"-x\"] }\n", []string{`profiles.a.options: "docker" is not a run mechanism`}},
		"profile gpu disabled":  {"[general]\ndata_dir = \"/x\"\n[profiles.a]\ngpu = true\n", []string{"profiles.a.gpu = true needs [gpu] enabled = true"}},
		"profile typo":          {"[general]\ndata_dir = \"/x\"\n[profiles.a]\nbind = []\n", []string{`unknown key "profiles.a.bind"`}},
		"limit default above":   {"[general]\ndata_dir = \"/x\"\n[limits]\ndefault_cpus = 4\nmax_cpus = 2\n", []string{"limits.default_cpus (4) is above limits.max_cpus (2)"}},
		"pin without script":    {"[general]\ndata_dir = \"/x\"\n[general.apptainer]\nprep_script_sha256 = \"" + strings.Repeat("a", 64) + "\"\n", []string{"general.apptainer.prep_script_sha256 is set but prep_script is not"}},
		"bad pin":               {"[general]\ndata_dir = \"/x\"\n[general.charliecloud]\nprep_script = \"/p.sh\"\nprep_script_sha256 = \"abc\"\n", []string{"general.charliecloud.prep_script_sha256 must be the script's 64 hex digit SHA-256 (sha256sum /p.sh)"}},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := Parse(c.doc, bob)
			require.Error(t, err)
			for _, w := range c.want {
				assert.Contains(t, err.Error(), w)
			}
			assert.NotContains(t, err.Error(), "\n", "the job log gets one line")
		})
	}
}

func TestLoadNamesTheFile(t *testing.T) {
	dir := t.TempDir()
	_, err := Load(filepath.Join(dir, "nope.toml"), bob)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "nope.toml")

	p := filepath.Join(dir, "c.toml")
	require.NoError(t, os.WriteFile(p, []byte("[general]\nexecutor=\"x\"\n"), 0o600))
	_, err = Load(p, bob)
	require.Error(t, err)
	assert.True(t, strings.HasPrefix(err.Error(), "config "+p+": "), err.Error())

	require.NoError(t, os.WriteFile(p, []byte("[general]\ndata_dir=\"/d\"\nkill_timeout=\"5s\"\n"), 0o600))
	cfg, err := Load(p, bob)
	require.NoError(t, err)
	assert.Equal(t, p, cfg.Path)
	assert.Equal(t, 5*time.Second, cfg.General.KillTimeout.Duration)
}

func TestMechanismSelection(t *testing.T) {
	cfg, err := Parse("[general]\ndata_dir=\"/d\"\nrun_mechanism=\"apptainer\"\n[general.apptainer]\ndefault_image=\"x\"\n", bob)
	require.NoError(t, err)
	require.NotNil(t, cfg.Mechanism())
	assert.Equal(t, "x", cfg.Mechanism().DefaultImage)
}

func TestPodmanTable(t *testing.T) {
	doc := "[general]\ndata_dir=\"/d\"\nrun_mechanism=\"podman\"\n[general.podman]\ndefault_image=\"x\"\n" +
		"image_storage_dir=\"$HOME/img\"\nuser_entry_point=[\"/entry.sh\", \"--\"]\nrunner_entry_point=[\"/bin/env\"]\n"
	cfg, err := Parse(doc, bob)
	require.NoError(t, err)
	m := cfg.Mechanism()
	require.NotNil(t, m)
	assert.Same(t, &cfg.General.Podman, m)
	assert.Equal(t, "x", m.DefaultImage)
	assert.Equal(t, bob.Home+"/img", m.ImageStorageDir)
	assert.Equal(t, PullAlways, m.PullPolicy)
	assert.Equal(t, []string{"/entry.sh", "--"}, m.UserEntryPoint)
	assert.Equal(t, []string{"/bin/env"}, m.RunnerEntryPoint)
}

// FuzzParse checks that no input crashes the loader and that whatever it
// accepts is valid and has its defaults applied.
func FuzzParse(f *testing.F) {
	f.Add("[general]\ndata_dir = \"$HOME/ci\"\n")
	f.Add("[general]\ndata_dir = \"/x\"\nexecutor = \"slurm\"\n[batch]\npending_limit = \"1h\"\n")
	f.Add("[general]\ndata_dir=\"/d\"\nrun_mechanism=\"charliecloud\"\n[general.charliecloud]\nimage_allowlist=[\"^a.*\"]\nvolume_prefixes=[\"/scratch\"]\n")
	f.Add("[general\n")
	f.Add("a = [1, \"x\"]\n")
	f.Fuzz(func(t *testing.T, doc string) {
		cfg, err := Parse(doc, bob)
		if err != nil {
			if strings.Contains(err.Error(), "\n") {
				t.Fatalf("multi-line error: %q", err)
			}
			return
		}
		if cfg.General.DataDir == "" || cfg.General.Executor == "" || cfg.General.KillTimeout.Duration <= 0 {
			t.Fatalf("accepted config without defaults: %+v", cfg.General)
		}
		if err := cfg.Validate(); err != nil {
			t.Fatalf("accepted config fails validation: %v", err)
		}
	})
}

func TestByteSize(t *testing.T) {
	for in, want := range map[string]int64{"": 0, "0": 0, "1": 1, "512M": 512 << 20, "20G": 20 << 30, "20GB": 20 << 30, "3GiB": 3 << 30, "1t": 1 << 40, "64k": 64 << 10} {
		var b ByteSize
		require.NoError(t, b.UnmarshalText([]byte(in)), in)
		assert.Equal(t, want, b.Bytes, in)
	}
	for _, in := range []string{"-1", "1.5G", "G", "20X", "ten"} {
		var b ByteSize
		assert.Error(t, b.UnmarshalText([]byte(in)), in)
	}
	_, err := Parse("[general]\ndata_dir = \"/d\"\n[general.charliecloud]\ncache_max_size = \"lots\"\n", UserInfo{Name: "u", Home: "/h"})
	assert.ErrorContains(t, err, "not a size")
	cfg, err := Parse("[general]\ndata_dir = \"/d\"\n[general.apptainer]\ncache_max_size = \"2G\"\ncache_max_age = \"48h\"\nmax_concurrent_builds = 3\n", UserInfo{Name: "u", Home: "/h"})
	require.NoError(t, err)
	assert.Equal(t, int64(2<<30), cfg.General.Apptainer.CacheMaxSize.Bytes)
	assert.Equal(t, 48*time.Hour, cfg.General.Apptainer.CacheMaxAge.Duration)
	assert.Equal(t, 3, cfg.General.Apptainer.MaxConcurrentBuilds)
	_, err = Parse("[general]\ndata_dir = \"/d\"\n[general.apptainer]\nmax_concurrent_builds = -1\n", UserInfo{Name: "u", Home: "/h"})
	assert.ErrorContains(t, err, "max_concurrent_builds must be positive")
}

func TestDiagnoseSiteTables(t *testing.T) {
	doc := "[general]\ndata_dir = \"/x\"\n[profiles.a]\nbinds = [\"rel:/opt\"]\n[limits]\ndefault_cpus = 4\nmax_cpus = 2\n"
	cfg, probs := Diagnose(doc, bob)
	require.NotNil(t, cfg)
	require.Len(t, probs, 2)
	assert.Equal(t, "profiles.a.binds", probs[0].Key)
	assert.Equal(t, 4, probs[0].Line)
	assert.Equal(t, "limits.default_cpus", probs[1].Key)
	assert.Equal(t, 6, probs[1].Line)
	assert.Equal(t, DefaultServiceWait, cfg.Services.WaitTimeout.Duration, "defaults as Parse applies them")
}
