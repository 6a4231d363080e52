package stages_test

// Jacamar CI configurations and jobs as written (docs/config.md, "Moving
// from Jacamar"): seed 004's example configuration and example pipeline run
// through the built ci-exec with real ch-run, and the places where ci-exec
// means something else than Jacamar fail with the key and the fix.

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/runnerdouble"
	"github.com/ci-exec/ci-exec/internal/testenv"
)

// seed004Config is internal/config/testdata/jacamar-seed004.toml (the
// guide's example added to a Jacamar config) with only what every site sets
// to its own paths changed: data_dir, and image_storage_dir appended to the
// guide's [general.charliecloud] table so the test's images stay in its own
// directory.
func seed004Config(t *testing.T, dataDir, storage string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "config", "testdata", "jacamar-seed004.toml"))
	require.NoError(t, err)
	const jacamarDataDir = "data_dir = \"$HOME\"\n"
	doc := string(b)
	require.Equal(t, 1, strings.Count(doc, jacamarDataDir), "testdata changed: data_dir line not found")
	doc = strings.Replace(doc, jacamarDataDir, fmt.Sprintf("data_dir = %q\n", dataDir), 1)
	require.True(t, strings.HasSuffix(doc, "user_volume_variable = \"CH_VOLUMES\"\n"), "testdata changed: the guide's table must come last")
	return doc + fmt.Sprintf("image_storage_dir = %q\n", storage)
}

// seed004Image is the guide's job image, registry.access.redhat.com/ubi9/
// ubi-minimal:latest, with only the registry host replaced by the local
// anonymous test registry (the guide's registry needs no credentials
// either); it holds the tiny test image.
func seed004Image(t *testing.T) string {
	t.Helper()
	anon := testenv.Fact(t, "CI_EXEC_TEST_IMAGE_ANON")
	image := testenv.Fact(t, "CI_EXEC_TEST_REGISTRY_ANON") + "/ubi9/ubi-minimal:latest"
	pushTag(t, anon, image)
	return image
}

// seed004Runner is a runner double running ci-exec as u with seed 004's
// configuration; it returns the user's data dir too.
func seed004Runner(t *testing.T, u testenv.User) (runnerdouble.Config, string) {
	t.Helper()
	dir := testenv.PrivateDir(t, u)
	storage := filepath.Join(dir, "storage")
	require.NoError(t, os.Mkdir(storage, 0o755))
	require.NoError(t, os.Chown(storage, u.UID, u.GID))
	data := filepath.Join(dir, "data")
	cfg := seed004Config(t, data+"/$USER", storage)
	t.Logf("config:\n%s", cfg)
	return runnerConfig(t, u, testenv.WriteConfig(t, dir, cfg), dir), filepath.Join(data, u.Name)
}

// TestJacamarSeed004Pipeline runs the guide's example pipeline: hello-host
// (no image: the host) writes date.txt, hello-container (an image: ch-run)
// reads it, and the pipeline-wide after_script runs `whoami` in each. The
// runner double has no artifact server: date.txt reaches the second job
// through the builds dir the two jobs share (one runner, one concurrency
// slot, GIT_STRATEGY none), which is the same directory the real runner's
// artifact download writes into on the host and ci-exec binds into the
// container.
func TestJacamarSeed004Pipeline(t *testing.T) {
	for _, u := range testenv.Users(t) {
		t.Run(u.Name, func(t *testing.T) {
			testenv.RequireBinary(t, "ch-run")
			runner, _ := seed004Runner(t, u)
			image := seed004Image(t)
			afterScript := []string{"whoami"}

			host := runJob(t, runner, runnerdouble.Job{
				ID:   101,
				Name: "hello-host",
				// This job runs on the host system because no image is provided.
				Script:      []string{"cat /etc/os-release", "date >> date.txt"},
				AfterScript: afterScript,
			})
			require.True(t, host.Succeeded(), host.Error)
			assert.Contains(t, host.Log, "The job names no image: its scripts run on the host.")
			assert.Contains(t, host.Log, "\nID=debian\n", "the host's os-release")
			assert.Contains(t, host.Log, "\n"+u.Name+"\n", "after_script's whoami on the host")
			date, err := os.ReadFile(filepath.Join(host.ProjectDir, "date.txt"))
			require.NoError(t, err)
			require.NotEmpty(t, strings.TrimSpace(string(date)))

			ctr := runJob(t, runner, runnerdouble.Job{
				ID:    102,
				Name:  "hello-container",
				Image: image,
				// Because we have defined an image our job will instead run using Charliecloud.
				Script:      []string{"cat /etc/os-release", "cat date.txt"},
				AfterScript: afterScript,
			})
			require.True(t, ctr.Succeeded(), ctr.Error)
			assert.Equal(t, host.ProjectDir, ctr.ProjectDir, "both jobs use the same builds dir")
			assert.Contains(t, ctr.Log, "Running build_script in "+image)
			assert.Contains(t, ctr.Log, "Running after_script in "+image, "user scripts, after_script included, run in the job's image")
			assert.NotContains(t, ctr.Log, "Running get_sources in", "git, artifacts and cache run on the host")
			assert.Contains(t, ctr.Log, "\nID=citiny\n", "the image's os-release")
			assert.NotContains(t, ctr.Log, "ID=debian")
			assert.Contains(t, ctr.Log, string(date), "the first job's file is seen in the container")
			assert.Contains(t, ctr.Log, "\n"+u.Name+"\n", "whoami in the container is the job user")
		})
	}
}

// TestJacamarSeed004Volume is the guide's commented-out CH_VOLUMES_0: with
// the guide's configuration (user_volume_variable, no volume_prefixes) ci-exec
// refuses it, where Jacamar would bind it, and says which keys to change.
func TestJacamarSeed004Volume(t *testing.T) {
	testenv.RequireBinary(t, "ch-run")
	u := testenv.Unprivileged(t)
	runner, data := seed004Runner(t, u)
	res := runJob(t, runner, runnerdouble.Job{
		Name:      "hello-container",
		Image:     seed004Image(t),
		Variables: map[string]string{"CH_VOLUMES_0": data + ":/example/scratch"},
		Script:    []string{"cat /etc/os-release"},
	})
	assertRefusedBeforePull(t, res, "CH_VOLUMES_0: user volumes are not enabled on this runner",
		"general.charliecloud.user_volume_variable is set but general.charliecloud.volume_prefixes is empty",
		"remove the CH_VOLUMES_* variables", "volume_prefixes")
}

// TestJacamarPrepScriptWithoutImage: prep_script runs in every prepare, for
// jobs that run on the host too (Jacamar runs it in prepare_exec).
func TestJacamarPrepScriptWithoutImage(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		dir := testenv.PrivateDir(t, u)
		out := filepath.Join(dir, "prep.out")
		script := filepath.Join(dir, "prep.sh")
		require.NoError(t, os.WriteFile(script, []byte("#!/bin/sh\necho \"uid=$(id -u) image=[$CI_EXEC_IMAGE] mech=$CI_EXEC_MECHANISM\" > "+out+"\n"), 0o755))
		e := containerRunner(t, rt, u, "", fmt.Sprintf("prep_script = %q", script))
		res := runJob(t, e.runner, runnerdouble.Job{Script: []string{`grep '^ID=' /etc/os-release`}})
		require.True(t, res.Succeeded(), res.Error)
		assert.Contains(t, res.Log, "ID=debian", "the job runs on the host")
		b, err := os.ReadFile(out)
		require.NoError(t, err, "prep_script must run for a job without an image")
		assert.Equal(t, fmt.Sprintf("uid=%d image=[] mech=%s\n", u.UID, rt.mechanism()), string(b))
	})
}

// TestJacamarForceWithoutDefaultImage: force_mechanism without default_image
// is a valid configuration, as in Jacamar; a job that names an image runs in
// it, one that names none fails as a build failure saying what to add, and
// never runs on the host.
func TestJacamarForceWithoutDefaultImage(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		e := containerRunner(t, rt, u, "force_mechanism = true", "")
		j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
		j.Script = []string{`grep '^ID=' /etc/os-release`}
		res := runJob(t, e.runner, j)
		require.True(t, res.Succeeded(), res.Error)
		assert.Contains(t, res.Log, "ID=citiny")

		res = runJob(t, e.runner, runnerdouble.Job{Script: []string{`echo ran-on-the-host`}})
		assertRefusedBeforePull(t, res, "the job names no image",
			fmt.Sprintf("(general.force_mechanism) with no %s.default_image", strings.Trim(rt.tableHeader(), "[]")),
			"add an image: to the job, or ask the admin to set default_image")
		assert.NotContains(t, res.Log, "ran-on-the-host")
	})
}
