package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// seed004Snippet is the example configuration of seed 004 (Jacamar CI's
// Charliecloud guide), character for character.
const seed004Snippet = `[general]
run_mechanism = "charliecloud"

[general.charliecloud]
# Allowing users to define their own mounted volumes is recommended but optional.
user_volume_variable = "CH_VOLUMES"
`

func TestJacamarSeed004ConfigLoads(t *testing.T) {
	path := filepath.Join("testdata", "jacamar-seed004.toml")
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	// The file is the guide's snippet with only the existing config's
	// required [general] keys added after the [general] line.
	doc := string(b)
	_, rest, ok := strings.Cut(seed004Snippet, "[general]\n")
	require.True(t, ok)
	assert.Contains(t, doc, rest, "testdata must keep the guide's lines unchanged")

	cfg, err := Load(path, bob)
	require.NoError(t, err)
	g := cfg.General
	assert.Equal(t, "/home/bob", g.DataDir)
	assert.Equal(t, ExecutorShell, g.Executor)
	assert.Equal(t, MechanismCharliecloud, g.RunMechanism)
	assert.False(t, g.ForceMechanism)
	m := cfg.Mechanism()
	require.NotNil(t, m)
	assert.Equal(t, "CH_VOLUMES", m.UserVolumeVariable)
	assert.Empty(t, m.VolumePrefixes, "the guide sets no prefixes: a job's CH_VOLUMES_n is refused at prepare with the fix")
	assert.Equal(t, PullAlways, m.PullPolicy)
}

func TestJacamarAllSeedKeysLoad(t *testing.T) {
	cfg, err := Load(filepath.Join("testdata", "jacamar-all-keys.toml"), bob)
	require.NoError(t, err)
	assert.Equal(t, ExecutorSlurm, cfg.General.Executor, `Jacamar's "sbatch" is the Slurm executor`)
	assert.True(t, cfg.IsBatch())
	m := cfg.Mechanism()
	require.NotNil(t, m)
	assert.Equal(t, "/usr/bin", m.ApplicationPath)
	assert.Equal(t, []string{"--set-env=RUNNER=1"}, m.RunnerOptions)
	assert.Equal(t, PullIfNotPresent, m.RunnerPullPolicy)
	assert.Equal(t, "registry.example.com/ci/default:latest", m.DefaultImage)
	assert.Equal(t, []string{`^registry\.example\.com/.*$`, `docker\.io/library/.*`}, m.ImageAllowlist)
	assert.Equal(t, "/etc/ci-exec/prep.sh", m.PrepScript)
	assert.True(t, m.DisableUserArgs)
	assert.True(t, m.DisableConvert)
	assert.Equal(t, "/target/dir", m.ImageStorageDir)
}

// TestJacamarDifferences covers each place where a Jacamar configuration
// means something else in ci-exec (docs/config.md, "Moving from Jacamar"):
// accepted where Jacamar's meaning is as safe, refused with the key and
// the fix where ci-exec keeps the safer behaviour.
func TestJacamarDifferences(t *testing.T) {
	const head = "[general]\ndata_dir = \"/d\"\nrun_mechanism = \"charliecloud\"\n"
	t.Run("force_mechanism without default_image loads", func(t *testing.T) {
		cfg, err := Parse(head+"force_mechanism = true\n", bob)
		require.NoError(t, err, "as in Jacamar; jobs without an image then fail in prepare")
		assert.True(t, cfg.General.ForceMechanism)
		assert.Empty(t, cfg.Mechanism().DefaultImage)
	})
	t.Run("user_volume_variable without volume_prefixes loads", func(t *testing.T) {
		_, err := Parse(head+"[general.charliecloud]\nuser_volume_variable = \"CH_VOLUMES\"\n", bob)
		require.NoError(t, err)
	})

	refused := map[string]struct {
		doc  string
		want []string
	}{
		"prefix allowlist entry": {head + "[general.charliecloud]\nimage_allowlist = ['^registry\\.example\\.com/']\n",
			[]string{`general.charliecloud.image_allowlist[0]: '^registry\.example\.com/' matches no image`, "whole image reference",
				`no reference ends in "/"`, `write '^registry\.example\.com/.*'`}},
		"prefix entry with $": {head + "[general.apptainer]\nimage_allowlist = ['a\\.io/', 'ok/.*', 'b\\.io:$']\n",
			[]string{`general.apptainer.image_allowlist[0]: 'a\.io/' matches no image`, `write 'a\.io/.*'`,
				`general.apptainer.image_allowlist[2]: 'b\.io:$' matches no image`, `write 'b\.io:.*$'`}},
		"prefix alternation": {head + "[general.charliecloud]\nimage_allowlist = ['a\\.io/|b\\.io/']\n",
			[]string{"image_allowlist[0]", "matches no image", "end each alternative with"}},
		"grouped alternation": {head + "[general.charliecloud]\nimage_allowlist = ['^(a\\.io/|b\\.io/)']\n",
			[]string{"image_allowlist[0]", "matches no image", `write '^(a\.io/|b\.io/).*'`}},
		"factored alternation": {head + "[general.charliecloud]\nimage_allowlist = ['^reg\\.(a|b)\\.io/']\n",
			[]string{"image_allowlist[0]", "matches no image", `write '^reg\.(a|b)\.io/.*'`}},
		"sudo downscope": {head + "[auth]\ndownscope = \"sudo\"\n",
			[]string{`auth.downscope = "sudo" is not supported`, `use "setuid"`}},
		"auth logging table": {head + "[auth.logging]\nenabled = true\n",
			[]string{`unknown key "auth.logging" (ci-exec writes its audit trail with [auth] audit_log`}},
		"auth typo": {head + "[auth]\nuser_alowlist = [\"a\"]\n",
			[]string{`unknown key "auth.user_alowlist" (check the spelling`}},
		"jacamar podman entry point": {head + "[general.podman]\nuser_entry_point = [\"/bin/bash\", \"-l\", \"-c\"]\n",
			[]string{`general.podman.user_entry_point: an entry point ending in "-c"`, `exec "$@"`}},
		"relative podman entry point": {head + "[general.podman]\nrunner_entry_point = [\"bash\"]\n",
			[]string{`general.podman.runner_entry_point: the program must be an absolute path in the image, got "bash"`}},
		"entry point outside podman": {head + "[general.apptainer]\nuser_entry_point = [\"/bin/bash\"]\n",
			[]string{`general.apptainer.user_entry_point is a Podman setting`}},
		"jacamar general key and a typo": {head + "custom_build_dir = true\nexecuter = \"shell\"\n",
			[]string{`unknown key "general.custom_build_dir" (ci-exec does not let jobs choose their builds dir`,
				`unknown key "general.executer" (check the spelling`}},
		"jacamar executor": {"[general]\ndata_dir = \"/d\"\nexecutor = \"flux\"\n",
			[]string{`general.executor must be "shell" or "slurm", got "flux"`}},
	}
	for name, c := range refused {
		t.Run(name, func(t *testing.T) {
			_, err := Parse(c.doc, bob)
			require.Error(t, err)
			for _, w := range c.want {
				assert.Contains(t, err.Error(), w)
			}
			assert.NotContains(t, err.Error(), "\n")
		})
	}

	// Entries that can match a whole reference stay valid, whichever way
	// they are anchored.
	for _, e := range []string{`^registry\.example\.com/.*`, `registry\.example\.com/.*$`, `alpine`, `^a/b:1\.0$`,
		`.*`, `docker\.io/library/(alpine|busybox):.*`, `x/` + "[a-z]+", `registry\.io/[^/]+/` + ".*"} {
		assert.NoError(t, checkAllowlistEntry(e), e)
	}
}
