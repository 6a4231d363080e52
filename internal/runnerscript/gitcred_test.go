package runnerscript

import (
	"errors"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const gitcredToken = "glcbt-64_git-credential-token-5"

// insteadOfLine is a line as setupExternalGitConfig writes it
// (CommandArgExpand: git escaped, the arguments in plain double quotes).
func insteadOfLine(q quoting, ext, key, org string) string {
	args := []string{"config", "--file", ext, "--replace-all", "url." + key + ".insteadOf", org, "^" + regexp.QuoteMeta(org) + "$"}
	return q.quote("git") + ` "` + strings.Join(args, `" "`) + `"`
}

func helperLine(q quoting, ext, host string) string {
	return credHelperLine("", `"`+ext+`"`, host, q)
}

func TestRewriteGitCredentials(t *testing.T) {
	const ext = "/b/p.tmp/.gitlab-runner.ext.conf"
	const check = exitCodeCheck
	auth := "gitlab-ci-token:" + gitcredToken + "@"
	for _, q := range []quoting{ansiC, posix} {
		name := map[quoting]string{ansiC: "ansi-c", posix: "posix"}[q]
		tok := export(q, "CI_JOB_TOKEN", gitcredToken)
		include := command(q, "git", "config", "--file", "/b/p.tmp/git-template/config", "--replace-all", "include.path", ext)
		cases := []struct {
			name     string
			in, want []string
			rules    int
		}{
			{"the runner's two rules, one host", []string{
				tok,
				insteadOfLine(q, ext, "https://"+auth+"gitlab.example/g/p.git", "https://gitlab.example/g/p.git"),
				insteadOfLine(q, ext, "https://"+auth+"gitlab.example", "https://gitlab.example"),
				include,
			}, []string{
				tok,
				helperLine(q, ext, "https://gitlab.example"),
				include,
			}, 2},
			{"ssh rules of GIT_SUBMODULE_FORCE_HTTPS stay, without the token", []string{
				tok,
				insteadOfLine(q, ext, "https://"+auth+"gitlab.example", "https://gitlab.example"),
				insteadOfLine(q, ext, "https://"+auth+"gitlab.example/", "git@gitlab.example:"),
				insteadOfLine(q, ext, "https://"+auth+"gitlab.example", "ssh://git@gitlab.example"),
				include,
			}, []string{
				tok,
				insteadOfLine(q, ext, "https://gitlab.example/", "git@gitlab.example:"),
				insteadOfLine(q, ext, "https://gitlab.example", "ssh://git@gitlab.example"),
				helperLine(q, ext, "https://gitlab.example"),
				include,
			}, 3},
			{"a port is part of the host; two hosts get two helpers", []string{
				tok,
				insteadOfLine(q, ext, "http://"+auth+"127.0.0.1:8080/g/p.git", "http://127.0.0.1:8080/g/p.git"),
				insteadOfLine(q, ext, "https://"+auth+"gitlab.example", "https://gitlab.example"),
				insteadOfLine(q, ext, "http://"+auth+"127.0.0.1:8080", "http://127.0.0.1:8080"),
			}, []string{
				tok,
				helperLine(q, ext, "http://127.0.0.1:8080"),
				helperLine(q, ext, "https://gitlab.example"),
			}, 3},
			{"a rule without a token (an admin's) is kept as it is", []string{
				tok,
				insteadOfLine(q, ext, "https://"+auth+"gitlab.example/g/p.git", "https://gitlab.example/g/p.git"),
				insteadOfLine(q, ext, "https://mirror.example/", "https://github.com/"),
			}, []string{
				tok,
				insteadOfLine(q, ext, "https://mirror.example/", "https://github.com/"),
				helperLine(q, ext, "https://gitlab.example"),
			}, 1},
			{"exit code checks (FF_ENABLE_BASH_EXIT_CODE_CHECK) go with their command", []string{
				tok,
				insteadOfLine(q, ext, "https://"+auth+"gitlab.example/g/p.git", "https://gitlab.example/g/p.git"), check,
				insteadOfLine(q, ext, "https://"+auth+"gitlab.example/", "git@gitlab.example:"), check,
				include, check,
			}, []string{
				tok,
				insteadOfLine(q, ext, "https://gitlab.example/", "git@gitlab.example:"), check,
				helperLine(q, ext, "https://gitlab.example"), check,
				include, check,
			}, 2},
			{"indented, and a second setup of the same file gets no second helper", []string{
				tok,
				"if true ; then",
				"  " + insteadOfLine(q, ext, "https://"+auth+"gitlab.example", "https://gitlab.example"),
				"fi",
				insteadOfLine(q, ext, "https://"+auth+"gitlab.example", "https://gitlab.example"),
			}, []string{
				tok,
				"if true ; then",
				"  " + helperLine(q, ext, "https://gitlab.example"),
				"fi",
			}, 2},
		}
		for _, tc := range cases {
			t.Run(name+"/"+tc.name, func(t *testing.T) {
				in := script(q, false, tc.in...)
				res, err := Rewrite(in, []string{gitcredToken})
				require.NoError(t, err)
				assert.Equal(t, tc.rules, res.GitCredentials)
				assert.Equal(t, strings.Join(tc.want, "\n")+"\n", res.Bodies[0])
				require.NoError(t, Check(t.Context(), bashPath(t), res.Script, res.Bodies, nil))
				again, err := Rewrite(res.Script, []string{gitcredToken})
				require.NoError(t, err)
				assert.False(t, again.Changed(), "idempotent")
			})
		}
	}
}

// What the rewrite cannot vouch for is still refused, with the hint to
// turn FF_GIT_URLS_WITHOUT_TOKENS on.
func TestRewriteGitCredentialsRefuses(t *testing.T) {
	const ext = "/b/p.tmp/.gitlab-runner.ext.conf"
	const dep = "glcbt-64_dependency-token-6"
	q := ansiC
	auth := "gitlab-ci-token:" + gitcredToken + "@"
	rule := insteadOfLine(q, ext, "https://"+auth+"gitlab.example/g/p.git", "https://gitlab.example/g/p.git")
	cases := []struct {
		name  string
		lines []string
	}{
		{"no CI_JOB_TOKEN exported before the rule: the helper would have nothing", []string{rule, export(q, "CI_JOB_TOKEN", gitcredToken)}},
		{"CI_JOB_TOKEN exported inside a block, not at the top", []string{"  " + export(q, "CI_JOB_TOKEN", gitcredToken), rule}},
		{"a dependency's token, which the helper does not hand out", []string{export(q, "CI_JOB_TOKEN", gitcredToken),
			insteadOfLine(q, ext, "https://gitlab-ci-token:"+dep+"@gitlab.example", "https://gitlab.example")}},
		{"another user than gitlab-ci-token", []string{export(q, "CI_JOB_TOKEN", gitcredToken),
			insteadOfLine(q, ext, "https://oauth2:"+gitcredToken+"@gitlab.example", "https://gitlab.example")}},
		{"a pattern the runner does not write", []string{export(q, "CI_JOB_TOKEN", gitcredToken),
			q.quote("git") + ` "config" "--file" "` + ext + `" "--replace-all" "url.https://` + auth + `gitlab.example.insteadOf" "https://gitlab.example" ".*"`}},
		{"an argument the shell would expand", []string{export(q, "CI_JOB_TOKEN", gitcredToken),
			insteadOfLine(q, "$HOME/ext", "https://"+auth+"gitlab.example", "https://gitlab.example")}},
		{"the token in a clone URL", []string{export(q, "CI_JOB_TOKEN", gitcredToken),
			command(q, "git", "clone", "https://"+auth+"gitlab.example/g/p.git", "/b/p")}},
		{"a user's own git config with the token", []string{export(q, "CI_JOB_TOKEN", gitcredToken),
			`git config --global "url.https://` + auth + `gitlab.example.insteadOf" "https://gitlab.example"`}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Rewrite(script(q, false, tc.lines...), []string{gitcredToken, dep})
			var le *LeakError
			require.True(t, errors.As(err, &le), "%v", err)
			assert.Equal(t, "git", le.Command)
			assert.Contains(t, err.Error(), "set FF_GIT_URLS_WITHOUT_TOKENS = true under [runners.feature_flags]")
			assert.NotContains(t, err.Error(), gitcredToken)
			assert.NotContains(t, err.Error(), dep)
		})
	}
}
