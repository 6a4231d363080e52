package runnerscript_test

// get_sources with FF_GIT_URLS_WITHOUT_TOKENS off and on, as the runner
// double writes it (internal/jobscript/gitsources.go, a transcription
// of gitlab-runner 19.4's writer that uses the runner's own URL code; see
// testdata/README.md).

import (
	"context"
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/runnerdouble"
	"github.com/ci-exec/ci-exec/internal/runnerscript"
	"github.com/ci-exec/ci-exec/internal/testenv"
)

const gitToken = "glcbt-fake-job-token-4246"

// credHelper is gitlab-runner's credential helper command.
const credHelper = `!f(){ if [ "$1" = "get" ] ; then echo "password=${CI_JOB_TOKEN}" ; fi ; } ; f`

type gitVariant struct {
	name      string
	vars      map[string]string
	rules     int // insteadOf rules with the token
	submodule bool
}

var gitVariants = []gitVariant{
	{name: "fetch", vars: map[string]string{"GIT_STRATEGY": "fetch"}, rules: 2},
	{name: "clone", vars: map[string]string{"GIT_STRATEGY": "clone"}, rules: 2},
	{name: "fetch-submodules", vars: map[string]string{"GIT_STRATEGY": "fetch", "GIT_SUBMODULE_STRATEGY": "recursive"}, rules: 2, submodule: true},
	{name: "clone-submodules", vars: map[string]string{"GIT_STRATEGY": "clone", "GIT_SUBMODULE_STRATEGY": "normal"}, rules: 2, submodule: true},
	{name: "fetch-posix-escapes", vars: map[string]string{"GIT_STRATEGY": "fetch", "FF_POSIXLY_CORRECT_ESCAPES": "true"}, rules: 2},
	{name: "fetch-exit-code-check", vars: map[string]string{"GIT_STRATEGY": "fetch", "FF_ENABLE_BASH_EXIT_CODE_CHECK": "true"}, rules: 2},
	// The ssh-to-https rules stay, without the token.
	{name: "fetch-force-https", vars: map[string]string{"GIT_STRATEGY": "fetch", "GIT_SUBMODULE_STRATEGY": "normal", "GIT_SUBMODULE_FORCE_HTTPS": "true"}, rules: 4, submodule: true},
}

// doubleGetSources is the double's get_sources for job with
// FF_GIT_URLS_WITHOUT_TOKENS set to ff.
func doubleGetSources(t *testing.T, j runnerdouble.Job, vars map[string]string, ff bool, buildsDir string) []byte {
	t.Helper()
	j.Variables = map[string]string{"FF_GIT_URLS_WITHOUT_TOKENS": strconv.FormatBool(ff)}
	for k, v := range vars {
		if k == "GIT_STRATEGY" {
			j.GitStrategy = v
			continue
		}
		j.Variables[k] = v
	}
	s, ok, err := runnerdouble.Config{}.StageScript(j, "get_sources", buildsDir, filepath.Join(filepath.Dir(buildsDir), "cache"))
	require.NoError(t, err)
	require.True(t, ok)
	return []byte(s)
}

// golden compares got with testdata/<rel>, or writes it under -update.
func golden(t *testing.T, rel string, got []byte) {
	t.Helper()
	p := filepath.Join("testdata", rel)
	// -update is the internal tests' flag (rewrite_test.go).
	if f := flag.Lookup("update"); f != nil && f.Value.String() == "true" {
		require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		require.NoError(t, os.WriteFile(p, got, 0o644))
	}
	want, err := os.ReadFile(p)
	require.NoError(t, err, "run go test -update to create %s", p)
	assert.Equal(t, string(want), string(got), "%s differs (go test -update rewrites it; review the diff)", p)
}

// body is the one eval body of a script, decoded.
func body(t *testing.T, script []byte) string {
	t.Helper()
	b := runnerscript.EvalBodies(script)
	require.Len(t, b, 1)
	return b[0]
}

// withoutFlagOnExtras is the body of a flag-on get_sources less what the
// flag adds besides the credential helper (the GIT_CONFIG_GLOBAL seed file,
// which the rewrite does not add), with the flag's export set to false.
func withoutFlagOnExtras(t *testing.T, b string, exitCodeCheck bool) string {
	t.Helper()
	const check = "_runner_exit_code=$?; if [ $_runner_exit_code -ne 0 ]; then exit $_runner_exit_code; fi"
	var out []string
	dropped := 0
	lines := strings.Split(b, "\n")
	for i := 0; i < len(lines); i++ {
		l := lines[i]
		switch {
		case strings.HasPrefix(l, `if [ -r "$HOME/`):
			for lines[i] != "fi" {
				i++
				dropped++
			}
			dropped++
			continue
		case strings.Contains(l, ".glr.gconf"):
			dropped++
			if i+1 < len(lines) && lines[i+1] == check {
				i++
				dropped++
			}
			continue
		case l == "export FF_GIT_URLS_WITHOUT_TOKENS=true":
			l = "export FF_GIT_URLS_WITHOUT_TOKENS=false"
		}
		out = append(out, l)
	}
	// export GIT_CONFIG_GLOBAL, rm the seed, two guarded includes, the
	// include of the external config (and the exit code checks of the
	// four commands).
	want := 9
	if exitCodeCheck {
		want += 4
	}
	require.Equal(t, want, dropped, "the flag-on extras as the runner writes them")
	return strings.Join(out, "\n")
}

func TestRewriteDoubleGetSources(t *testing.T) {
	bash := bashPath(t)
	const builds = "/srv/ci/builds"
	j := runnerdouble.Job{ID: 4246, Token: gitToken}
	for _, v := range gitVariants {
		t.Run(v.name, func(t *testing.T) {
			off := doubleGetSources(t, j, v.vars, false, builds)
			on := doubleGetSources(t, j, v.vars, true, builds)
			golden(t, "runnerdouble-get_sources/"+v.name+".ff-off.bash", off)
			golden(t, "runnerdouble-get_sources/"+v.name+".ff-on.bash", on)
			require.True(t, strings.Contains(body(t, off), "url.http://gitlab-ci-token:"+gitToken+"@127.0.0.1:1"),
				"the runner's flag-off rules carry the token (else this proves nothing)")

			res, err := runnerscript.Rewrite(off, []string{gitToken})
			require.NoError(t, err)
			golden(t, "golden/get_sources/"+v.name+".bash", res.Script)
			assert.Equal(t, v.rules, res.GitCredentials)
			assert.Zero(t, res.Moved)
			assert.True(t, res.Changed())
			require.NoError(t, runnerscript.Check(context.Background(), bash, res.Script, res.Bodies, []string{gitToken}))

			got := res.Bodies[0]
			assert.False(t, strings.Contains(got, "url.http://gitlab-ci-token:"+gitToken), "no rule with the token is left")
			assert.Equal(t, 1, strings.Count(got, "--add $'credential.http://127.0.0.1:1.helper'")+
				strings.Count(got, "--add credential.http://127.0.0.1:1.helper"), "one helper for the one host")
			assert.Equal(t, withoutFlagOnExtras(t, body(t, on), v.vars["FF_ENABLE_BASH_EXIT_CODE_CHECK"] == "true"), got,
				"the rewritten git setup is exactly what the runner writes with FF_GIT_URLS_WITHOUT_TOKENS on")

			again, err := runnerscript.Rewrite(res.Script, []string{gitToken})
			require.NoError(t, err)
			assert.Equal(t, string(res.Script), string(again.Script), "rewriting is idempotent")
			assert.False(t, again.Changed())

			onRes, err := runnerscript.Rewrite(on, []string{gitToken})
			require.NoError(t, err)
			assert.False(t, onRes.Changed(), "a flag-on script runs as the runner wrote it")
		})
	}
}

// TestRewrittenGetSourcesFetches runs the rewritten flag-off get_sources
// (and, for comparison, the flag-on one) for real against a git server that
// wants the job token, like GitLab: git gets it from the credential helper,
// no process sees it on its command line, and no file of the checkout or of
// the job's git config holds it.
func TestRewrittenGetSourcesFetches(t *testing.T) {
	bash := bashPath(t)
	srv := testenv.NewGitServer(t, "gitlab-ci-token", gitToken)
	subSha := srv.AddRepo(t, "demo-group/sub.git", testenv.GitRepo{Files: map[string]string{"sub.txt": "from the submodule\n"}})
	sha := srv.AddRepo(t, "demo-group/demo.git", testenv.GitRepo{
		Files:      map[string]string{"README": "hello from the repository\n"},
		Submodules: map[string][2]string{"sub": {srv.URL + "/demo-group/sub.git", subSha}},
	})
	for _, v := range gitVariants[:4] {
		for _, ff := range []bool{false, true} {
			t.Run(v.name+"/FF_GIT_URLS_WITHOUT_TOKENS="+strconv.FormatBool(ff), func(t *testing.T) {
				root := t.TempDir()
				builds := filepath.Join(root, "builds")
				home := filepath.Join(root, "home")
				require.NoError(t, os.MkdirAll(home, 0o755))
				j := runnerdouble.Job{ID: 4246, Token: gitToken, RepoURL: srv.URL + "/demo-group/demo.git", Sha: sha}
				in := doubleGetSources(t, j, v.vars, ff, builds)
				res, err := runnerscript.Rewrite(in, []string{gitToken})
				require.NoError(t, err)
				assert.Equal(t, ff, !res.Changed())
				require.NoError(t, runnerscript.Check(context.Background(), bash, res.Script, res.Bodies, nil))
				p := filepath.Join(root, "get_sources.bash")
				require.NoError(t, os.WriteFile(p, res.Script, 0o700))

				before := srv.Authenticated()
				watch := testenv.WatchCmdlines(gitToken)
				cmd := exec.Command(bash, "--noprofile", "--norc", p)
				cmd.Env = []string{"PATH=/usr/bin:/bin", "HOME=" + home, "LC_ALL=C"}
				cmd.Dir = root
				out, err := cmd.CombinedOutput()
				hits := watch()
				require.NoError(t, err, "%s", out)
				assert.Empty(t, hits, "no command line shows the token")
				assert.NotContains(t, string(out), gitToken)
				assert.Greater(t, srv.Authenticated(), before, "git authenticated to the server")
				assert.Empty(t, srv.Rejected(), "git never sent wrong credentials")

				project := filepath.Join(builds, "demo-group", "demo")
				readme, err := os.ReadFile(filepath.Join(project, "README"))
				require.NoError(t, err)
				assert.Equal(t, "hello from the repository\n", string(readme))
				if v.submodule {
					s, err := os.ReadFile(filepath.Join(project, "sub", "sub.txt"))
					require.NoError(t, err, "the submodule was fetched with the same credentials")
					assert.Equal(t, "from the submodule\n", string(s))
				}
				testenv.AssertNoFileHolds(t, builds, gitToken)

				ext := filepath.Join(project+".tmp", ".gitlab-runner.ext.conf")
				host := strings.TrimPrefix(srv.URL, "http://")
				cfg := gitOut(t, home, nil, "", "config", "-f", ext, "--get-regexp", "^credential\\.")
				want := "credential." + srv.URL + ".helper \ncredential." + srv.URL + ".helper " + credHelper + "\n" +
					"credential." + srv.URL + ".username gitlab-ci-token"
				if !ff {
					// The flag-off rules also cover the runner's own URL
					// (CI_SERVER_URL): its host gets the helper too.
					want += "\ncredential." + runnerdouble.ServerURL + ".helper \ncredential." + runnerdouble.ServerURL + ".helper " + credHelper + "\n" +
						"credential." + runnerdouble.ServerURL + ".username gitlab-ci-token"
				}
				assert.Equal(t, want, cfg)

				// git credential fill through that config hands out
				// CI_JOB_TOKEN from the environment.
				fill := gitOut(t, home, []string{"GIT_CONFIG_GLOBAL=" + ext, "CI_JOB_TOKEN=" + gitToken}, "protocol=http\nhost="+host+"\n\n",
					"credential", "fill")
				assert.Equal(t, "protocol=http\nhost="+host+"\nusername=gitlab-ci-token\npassword="+gitToken, fill)
			})
		}
	}
}

// gitOut runs git with a clean environment plus env and returns its trimmed stdout.
func gitOut(t *testing.T, home string, env []string, stdin string, args ...string) string {
	t.Helper()
	cmd := exec.Command("git", args...)
	cmd.Env = append([]string{"PATH=/usr/bin:/bin", "HOME=" + home, "GIT_CONFIG_NOSYSTEM=1", "GIT_TERMINAL_PROMPT=0"}, env...)
	cmd.Stdin = strings.NewReader(stdin)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	require.NoError(t, err, "git %v: %s", args, stderr.String())
	return strings.TrimSpace(string(out))
}

func bashPath(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("bash")
	require.NoError(t, err, "bash is needed to check scripts")
	return p
}
