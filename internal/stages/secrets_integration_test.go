package stages_test

// Integration tests of "no secret on a command line": the runner double
// writes the helper calls as gitlab-runner 19.4 does (the job token as
// --token on the helper's argv), the built ci-exec must move it into the
// helper's environment before the stage runs, on the host and in both
// runtimes, with the fake gitlab-runner helper recording its own argv and
// every exec on the host watched for the token.

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

const (
	// depToken is the token the payload gives a dependency (what
	// artifacts-downloader gets as --token).
	depToken = "glcbt-64_dependency-token-for-the-downloader"
	// maskedValue is a masked job variable: exported by the script, never
	// on a command line either.
	maskedValue = "masked-deploy-key-9f8e7d6c"
)

// withHelperOnPath puts the fake gitlab-runner first on the PATH the runner
// gives ci-exec, which passes it (pass_env) to host stages.
func withHelperOnPath(t *testing.T, c runnerdouble.Config) runnerdouble.Config {
	t.Helper()
	helper := testenv.FakeHelper(t)
	env := append([]string(nil), c.BaseEnv...)
	for i, kv := range env {
		if strings.HasPrefix(kv, "PATH=") {
			env[i] = "PATH=" + helper + ":" + strings.TrimPrefix(kv, "PATH=")
		}
	}
	c.BaseEnv = env
	return c
}

// helperJobs are two jobs of one project (base gives the token, image and
// registry): the first fills the cache and uploads artifacts, the second
// restores the cache and downloads the first one's artifacts with a
// dependency token.
func helperJobs(base runnerdouble.Job, id int64) (first, second runnerdouble.Job) {
	first = runnerdouble.Job{
		ID: id, Token: base.Token, Image: base.Image, Registry: base.Registry,
		MaskedVariables: map[string]string{"DEPLOY_KEY": maskedValue},
		Script:          []string{"mkdir -p out", `echo "built by $CI_JOB_ID" > out/result.txt`},
		Cache:           &runnerdouble.Cache{Key: "secrets-cache", Paths: []string{"out/"}},
		Artifacts:       &runnerdouble.Artifacts{Name: "secrets-artifacts", Paths: []string{"out/"}, ExpireIn: "1 day"},
	}
	second = runnerdouble.Job{
		ID: id + 1, Token: base.Token, Image: base.Image, Registry: base.Registry,
		MaskedVariables: map[string]string{"DEPLOY_KEY": maskedValue},
		Script:          []string{"cat out/result.txt"},
		Cache:           &runnerdouble.Cache{Key: "secrets-cache"},
		Dependencies:    []runnerdouble.Dependency{{ID: id, Name: "first", Token: depToken}},
	}
	return first, second
}

// runHelperJobs runs both jobs while every exec is watched and checks
// that no helper, and no process at all, saw a token on its command line.
func runHelperJobs(t *testing.T, c runnerdouble.Config, data string, base runnerdouble.Job, id int64) (*runnerdouble.Result, *runnerdouble.Result) {
	t.Helper()
	token := base.Token
	first, second := helperJobs(base, id)
	watch := testenv.WatchCmdlines(token, depToken, maskedValue)
	res1 := runJob(t, c, first)
	res2 := runJob(t, c, second)
	hits := watch()

	require.True(t, res1.Succeeded(), res1.Error)
	require.True(t, res2.Succeeded(), res2.Error)
	assert.Contains(t, res1.RunStages(), "upload_artifacts_on_success")
	assert.Contains(t, res1.RunStages(), "archive_cache")
	assert.Contains(t, res2.RunStages(), "restore_cache")
	assert.Contains(t, res2.RunStages(), "download_artifacts")
	assert.Contains(t, res1.Log, "201 Created  id="+fmt.Sprint(id)+" files=1", "the upload went through")
	assert.Contains(t, res2.Log, "Successfully extracted cache")
	assert.Contains(t, res2.Log, fmt.Sprintf("Downloading artifacts from coordinator... ok  id=%d files=1", id))
	assert.Contains(t, res2.Log, fmt.Sprintf("built by %d\n", id))

	// What each helper process was given, as it recorded it itself.
	calls, err := runnerdouble.HelperCalls(res2.ProjectDir)
	require.NoError(t, err)
	seen := map[string]int{}
	for _, call := range calls {
		seen[call.Command()]++
		for _, a := range call.Argv {
			for _, secret := range []string{token, depToken, maskedValue} {
				assert.NotContains(t, a, secret, "a helper got a secret on its command line: %q", call.Argv)
			}
			assert.NotEqual(t, "--token", a, "no --token argument is left: %q", call.Argv)
		}
		switch call.Command() {
		case "artifacts-uploader":
			assert.True(t, call.TokenEnvIs(token), "the uploader gets the job token from its environment")
		case "artifacts-downloader":
			assert.True(t, call.TokenEnvIs(depToken), "the downloader gets the dependency's token, not the job's")
		}
	}
	// Both jobs restore the cache (the first one finds none).
	for cmd, n := range map[string]int{"artifacts-uploader": 1, "artifacts-downloader": 1, "cache-archiver": 1, "cache-extractor": 2} {
		assert.Equal(t, n, seen[cmd], "%s calls (all: %v)", cmd, seen)
	}
	assert.Empty(t, hits, "a secret appeared in a command line")
	for _, res := range []*runnerdouble.Result{res1, res2} {
		for _, secret := range []string{token, depToken, maskedValue} {
			assert.NotContains(t, res.RawLog, secret)
			assert.NotContains(t, res.RunnerLog, secret)
		}
	}

	// retain_logs keeps the stage scripts, 0600 and with every secret masked.
	kept, err := filepath.Glob(filepath.Join(data, "scripts", "*", "*", fmt.Sprint(id), "*.bash"))
	require.NoError(t, err)
	names := map[string]bool{}
	for _, p := range kept {
		names[filepath.Base(p)] = true
		fi, err := os.Stat(p)
		require.NoError(t, err)
		assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm(), p)
		b, err := os.ReadFile(p)
		require.NoError(t, err)
		for _, secret := range []string{token, maskedValue} {
			assert.NotContains(t, string(b), secret, p)
		}
		if filepath.Base(p) == "upload_artifacts_on_success.bash" {
			assert.Contains(t, string(b), "CI_JOB_TOKEN=[MASKED] gitlab-runner artifacts-uploader", "the kept copy is the one that ran, masked")
		}
	}
	assert.True(t, names["upload_artifacts_on_success.bash"], "retain_logs kept the upload script: %v", kept)
	assertSecretFilesPrivate(t, []string{data}, token)
	assertSecretFilesPrivate(t, []string{data}, depToken)
	return res1, res2
}

func TestSecretsHostHelperTokenNotOnArgv(t *testing.T) {
	for _, u := range hostUsers(t) {
		t.Run(u.Name, func(t *testing.T) {
			c, data := hostRunner(t, u, "retain_logs = true")
			runHelperJobs(t, withHelperOnPath(t, c), data, runnerdouble.Job{Token: "glcbt-64_host-job-token-for-" + u.Name}, 9100)
		})
	}
}

func TestSecretsContainerHelperTokenNotOnArgv(t *testing.T) {
	forEachRuntimeAndUser(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		image := testenv.Fact(t, "CI_EXEC_TEST_IMAGE")
		t.Run("runner stages on the host", func(t *testing.T) {
			e := containerRunner(t, rt, u, "retain_logs = true", "")
			runHelperJobs(t, withHelperOnPath(t, e.runner), e.data, tokenJob(t, image), 9200)
		})
		t.Run("runner stages in runner_image", func(t *testing.T) {
			// The admin binds a gitlab-runner helper into the runner image
			// (busybox only: the stages run with its sh) and puts it on PATH.
			helper := testenv.FakeHelper(t)
			bindOpt, pathOpt := "--bind="+helper+":/mnt", "--set-env=PATH=/mnt:"+"/usr/local/bin:/usr/bin:/bin"
			switch rt.name {
			case "apptainer":
				pathOpt = "--env=PREPEND_PATH=/mnt"
			case "podman", "podman-template":
				bindOpt, pathOpt = "--volume="+helper+":/mnt", "--env=PATH=/mnt:/usr/local/bin:/usr/bin:/bin"
			}
			e := containerRunner(t, rt, u, "retain_logs = true", fmt.Sprintf("runner_image = %q\nrunner_options = [%q, %q]",
				image, bindOpt, pathOpt))
			res1, res2 := runHelperJobs(t, e.runner, e.data, tokenJob(t, image), 9300)
			assert.Contains(t, res1.Log, "Running upload_artifacts_on_success in "+image, "the uploader ran in the container")
			assert.Contains(t, res2.Log, "Running download_artifacts in "+image)
		})
	})
}

// A token in a helper argument ci-exec cannot move (here the artifact name)
// makes ci-exec refuse the stage: a system failure that names the stage,
// and the helper never runs.
func TestSecretsRefusesTokenInHelperArguments(t *testing.T) {
	u := testenv.Unprivileged(t)
	c, _ := hostRunner(t, u, "")
	c = withHelperOnPath(t, c)
	const token = "glcbt-64_token-in-an-artifact-name"
	j := runnerdouble.Job{
		ID: 9400, Token: token,
		Script:    []string{"mkdir -p out", "echo x > out/x"},
		Artifacts: &runnerdouble.Artifacts{Name: "artifacts-" + token, Paths: []string{"out/"}},
	}
	watch := testenv.WatchCmdlines(token)
	res := runJob(t, c, j)
	hits := watch()
	assert.Equal(t, runnerdouble.ReasonRunnerSystemFailure, res.FailureReason)
	assert.Contains(t, res.Log, "refusing to run the upload_artifacts_on_success stage: the job token would be on a command line")
	calls, err := runnerdouble.HelperCalls(res.ProjectDir)
	require.NoError(t, err)
	for _, call := range calls {
		assert.NotEqual(t, "artifacts-uploader", call.Command(), "the refused stage never ran")
	}
	assert.Empty(t, hits)
	assert.NotContains(t, res.RawLog, token)
}

// A pass_env variable whose value is a masked variable's value is masked in
// the logged container command, also when quoting it would split it.
func TestSecretsPassEnvMaskedInCommandLog(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		const secret = "it's a masked s3cret value"
		e := containerRunner(t, rt, u, "", `pass_env = ["CI_EXEC_PASSED"]`)
		e.runner.BaseEnv = append(e.runner.BaseEnv, "CI_EXEC_PASSED="+secret)
		j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
		j.MaskedVariables = map[string]string{"PASSED_TOO": secret}
		j.Script = []string{`echo "passed=${#CI_EXEC_PASSED} chars"`}
		res := runJob(t, e.runner, j)
		require.True(t, res.Succeeded(), res.Error)
		assert.Contains(t, res.Log, fmt.Sprintf("passed=%d chars", len(secret)), "the variable reached the container")
		assert.Contains(t, res.RawLog, "CI_EXEC_PASSED=[MASKED]", "the command line is logged, the value masked")
		assert.NotContains(t, res.RawLog, "s3cret")
	})
}

// The runner's get_sources puts the job token into git's arguments unless
// FF_GIT_URLS_WITHOUT_TOKENS is on (insteadOf rules with the token, the
// runner's default): ci-exec rewrites them into the credential helper the
// runner writes with the flag on, and the job fetches from a git server
// that wants the token, submodules included, with the token on no command
// line and in no file of the job.
func TestSecretsGitFetchWithoutTokenOnCommandLine(t *testing.T) {
	const token = "glcbt-64_token-for-git-insteadof"
	srv := testenv.NewGitServer(t, "gitlab-ci-token", token)
	subSha := srv.AddRepo(t, "g/sub.git", testenv.GitRepo{Files: map[string]string{"sub.txt": "from the submodule"}})
	sha := srv.AddRepo(t, "g/p.git", testenv.GitRepo{
		Files:      map[string]string{"README": "hello from the repository"},
		Submodules: map[string][2]string{"sub": {srv.URL + "/g/sub.git", subSha}},
	})
	for _, u := range hostUsers(t) {
		for _, tc := range []struct{ strategy, ff string }{{"fetch", "false"}, {"clone", "false"}, {"fetch", "true"}} {
			t.Run(u.Name+"/"+tc.strategy+"/FF_GIT_URLS_WITHOUT_TOKENS="+tc.ff, func(t *testing.T) {
				c, data := hostRunner(t, u, "")
				j := runnerdouble.Job{
					ID: 9500, Token: token, GitStrategy: tc.strategy, RepoURL: srv.URL + "/g/p.git", Sha: sha,
					Variables: map[string]string{"GIT_SUBMODULE_STRATEGY": "recursive", "FF_GIT_URLS_WITHOUT_TOKENS": tc.ff},
					Script: []string{
						`echo "readme: $(cat README)"`,
						`echo "submodule: $(cat sub/sub.txt)"`,
						`git config -f "$CI_PROJECT_DIR.tmp/.gitlab-runner.ext.conf" --get-regexp '^credential\.' | sed 's/^/ext: /'`,
					},
				}
				before := srv.Authenticated()
				watch := testenv.WatchCmdlines(token)
				res := runJob(t, c, j)
				hits := watch()
				require.True(t, res.Succeeded(), res.Error)
				assert.NotContains(t, res.Log, "refusing to run")
				assert.Contains(t, res.Log, "readme: hello from the repository")
				assert.Contains(t, res.Log, "submodule: from the submodule")
				assert.Contains(t, res.Log, "ext: credential."+srv.URL+".helper !f(){ if [ \"$1\" = \"get\" ] ; then echo \"password=${CI_JOB_TOKEN}\" ; fi ; } ; f")
				assert.Contains(t, res.Log, "ext: credential."+srv.URL+".username gitlab-ci-token")
				assert.Greater(t, srv.Authenticated(), before, "git authenticated to the server")
				assert.Empty(t, srv.Rejected(), "git never sent wrong credentials")
				assert.Empty(t, hits, "the token appeared on a command line")
				assert.NotContains(t, res.RawLog, token)
				testenv.AssertNoFileHolds(t, res.ProjectDir+".tmp", token)
				testenv.AssertNoFileHolds(t, res.ProjectDir, token)
				assertSecretFilesPrivate(t, []string{data}, token)
			})
		}
	}
}
