package runnerdouble

import (
	"github.com/ci-exec/ci-exec/internal/jobscript"

	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/testenv"
)

// capturedDir holds the scripts a real gitlab-runner 19.4 wrote (see its
// README); the double must write its helper calls the same way.
const capturedDir = "../runnerscript/testdata/runner-19.4"

// helperLines returns the lines of a script's eval body (still quoted as
// in the file: both sides quote the same way) that call gitlab-runner.
func helperLines(script string) []string {
	var out []string
	for _, l := range strings.Split(script, `\n`) {
		if strings.Contains(l, "gitlab-runner ") {
			out = append(out, strings.TrimSpace(l))
		}
	}
	return out
}

func TestHelperCallsAsTheRealRunnerWritesThem(t *testing.T) {
	// The captured job: data_dir /srv/ci/data, runner run-job-h, project
	// demo-group/demo, job 4246, cache key demo-cache on out/, artifacts
	// demo-artifacts of out/ for 1 day. Only the server URL differs.
	sc := jobscript.Context{
		ServerURL:   ServerURL,
		BuildsDir:   "/srv/ci/data/builds/run-job-h/000",
		CacheDir:    "/srv/ci/data/cache/run-job-h",
		ProjectDir:  "/srv/ci/data/builds/run-job-h/000/demo-group/demo",
		ProjectPath: "demo-group/demo",
		JobID:       4246,
		Token:       "glcbt-fake-job-token-4246",
		Cache:       &Cache{Key: "demo-cache", Paths: []string{"out/"}},
		Artifacts:   &Artifacts{Name: "demo-artifacts", Paths: []string{"out/"}, ExpireIn: "1 day"},
	}
	for _, stage := range []string{"restore_cache", "archive_cache", "upload_artifacts_on_success"} {
		t.Run(stage, func(t *testing.T) {
			want, err := os.ReadFile(filepath.Join(capturedDir, stage+".bash"))
			require.NoError(t, err)
			got, ok, err := sc.StageScript(stage, "bash")
			require.NoError(t, err)
			require.True(t, ok)
			w := strings.ReplaceAll(string(want), "http://127.0.0.1:44271", ServerURL)
			require.NotEmpty(t, helperLines(w))
			assert.Equal(t, helperLines(w), helperLines(got))
			assert.True(t, strings.HasPrefix(got, "#!/usr/bin/env bash\n\ntrap 'exit 1' TERM\n\n"+
				`case "$(set -o)" in *"pipefail"*) set -o pipefail;; esac; set -o errexit`+"\nset +o noclobber\n(trap 'exit 1' TERM; eval $'"),
				"the runner's preamble")
			assert.True(t, strings.HasSuffix(got, "') < /dev/null\nexit 0\n"))
		})
	}
	// No cache and no artifacts: the stages have nothing to do.
	for _, stage := range []string{"restore_cache", "archive_cache", "upload_artifacts_on_success", "download_artifacts"} {
		_, ok, err := jobscript.Context{}.StageScript(stage, "bash")
		require.NoError(t, err)
		assert.False(t, ok, stage)
	}
}

// TestCacheAndArtifactStages runs the double's cache, artifact and
// dependency stages with the fake helper, without ci-exec: the helper sees
// the job token on its command line, as with the real runner.
func TestCacheAndArtifactStages(t *testing.T) {
	helper := testenv.FakeHelper(t)
	f := newFake(t)
	f.cfg.BaseEnv[0] = "PATH=" + helper + ":" + os.Getenv("PATH")
	const token = "glcbt-runnerdouble-helper-token"
	job := Job{
		ID:           21,
		Token:        token,
		Script:       []string{"mkdir -p out && echo built-by-21 > out/result.txt"},
		Cache:        &Cache{Key: "k1", Paths: []string{"out/"}},
		Artifacts:    &Artifacts{Name: "a1", Paths: []string{"out/"}},
		Dependencies: []Dependency{{ID: 21, Name: "itself"}},
	}
	res, err := f.cfg.Run(context.Background(), job)
	require.NoError(t, err)
	t.Log(res.Log)
	// The dependency's artifacts do not exist yet: download_artifacts fails
	// the job, and cache and artifacts (when: on_success) are not saved.
	assert.Equal(t, []string{"prepare_script", "get_sources", "restore_cache", "download_artifacts",
		"cleanup_file_variables"}, res.RunStages())
	assert.Equal(t, StateFailed, res.State)
	assert.Contains(t, res.Log, "Failed to extract cache", "no cache yet")

	job.Dependencies = nil
	res, err = f.cfg.Run(context.Background(), job)
	require.NoError(t, err)
	require.True(t, res.Succeeded(), res.Log)
	assert.Equal(t, []string{"prepare_script", "get_sources", "restore_cache", "build_script",
		"archive_cache", "upload_artifacts_on_success", "cleanup_file_variables"}, res.RunStages())
	assert.Contains(t, res.Log, "Created cache")
	assert.Contains(t, res.Log, "201 Created  id=21 files=1")

	// A second job gets the cache back and downloads the first one's artifacts.
	job2 := Job{ID: 22, Token: token, Script: []string{"cat out/result.txt"},
		Cache: &Cache{Key: "k1"}, Dependencies: []Dependency{{ID: 21, Name: "first"}}}
	require.NoError(t, os.RemoveAll(filepath.Join(res.ProjectDir, "out")))
	res, err = f.cfg.Run(context.Background(), job2)
	require.NoError(t, err)
	require.True(t, res.Succeeded(), res.Log)
	assert.Contains(t, res.Log, "Successfully extracted cache")
	assert.Contains(t, res.Log, "\nbuilt-by-21\n")

	// when: always saves them after a failure too, in the _on_failure stages.
	res3, err := f.cfg.Run(context.Background(), Job{ID: 23, Token: token, Script: []string{"mkdir -p out", "exit 4"},
		Cache: &Cache{Key: "k3", Paths: []string{"out/"}, When: "always"}, Artifacts: &Artifacts{Paths: []string{"out/"}, When: "always"}})
	require.NoError(t, err)
	assert.Equal(t, 4, res3.ExitCode, "the job's own error wins")
	assert.Equal(t, []string{"prepare_script", "get_sources", "restore_cache", "build_script",
		"archive_cache_on_failure", "upload_artifacts_on_failure", "cleanup_file_variables"}, res3.RunStages())

	calls, err := HelperCalls(res.ProjectDir)
	require.NoError(t, err)
	var cmds []string
	leaked := false
	for _, c := range calls {
		cmds = append(cmds, c.Command())
		for _, a := range c.Argv {
			leaked = leaked || strings.Contains(a, token)
		}
		assert.True(t, c.TokenEnvIs(token), "the script exports CI_JOB_TOKEN: %v", c.Argv)
	}
	assert.Contains(t, cmds, "artifacts-uploader")
	assert.Contains(t, cmds, "artifacts-downloader")
	assert.Contains(t, cmds, "cache-archiver")
	assert.Contains(t, cmds, "cache-extractor")
	assert.True(t, leaked, "the runner's own scripts put the job token on the helpers' command lines")
	fi, err := os.Stat(filepath.Join(res.ProjectDir+".tmp", HelperRecord))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
}
