package runnerscript

import (
	"context"
	"errors"
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var update = flag.Bool("update", false, "rewrite testdata/golden from the captured scripts")

// capturedToken is the fake job token in testdata/runner-19.4 (see its README).
const capturedToken = "glcbt-fake-job-token-4246"

const capturedSecret = "s3cr3t-value-xyz"

// capturedDataDir is the data_dir the captured scripts use.
const capturedDataDir = "/srv/ci/data"

func capturedScripts(t *testing.T) map[string][]byte {
	t.Helper()
	paths, err := filepath.Glob("testdata/runner-19.4/*.bash")
	require.NoError(t, err)
	require.Len(t, paths, 8, "every captured stage")
	out := map[string][]byte{}
	for _, p := range paths {
		b, err := os.ReadFile(p)
		require.NoError(t, err)
		out[filepath.Base(p)] = b
	}
	return out
}

func bashPath(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("bash")
	require.NoError(t, err, "bash is needed to check scripts")
	return p
}

// helperCall is one run of the fake gitlab-runner: its argv and the
// CI_JOB_TOKEN in its environment.
type helperCall struct {
	argv     []string
	token    string
	hasToken bool
}

// fakeHelper is a gitlab-runner stand-in that records how it was called
// (the argv it received itself, so no short process can be missed).
const fakeHelper = `#!/bin/sh
n=$(ls "$REC" | wc -l)
printf '%s\0' "$0" "$@" > "$REC/$n.argv"
if [ "${CI_JOB_TOKEN+set}" = set ]; then printf '%s' "$CI_JOB_TOKEN" > "$REC/$n.env"; fi
mv "$REC/$n.argv" "$REC/$n.call"
`

// runScript runs script with bash, with the data_dir of the captured
// scripts moved to a temp dir and a fake gitlab-runner first on PATH, and
// returns the helper's calls in order.
func runScript(t *testing.T, script []byte) []helperCall {
	t.Helper()
	root := t.TempDir()
	bin, rec := filepath.Join(root, "bin"), filepath.Join(root, "rec")
	require.NoError(t, os.MkdirAll(bin, 0o755))
	require.NoError(t, os.MkdirAll(rec, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(bin, "gitlab-runner"), []byte(fakeHelper), 0o755))
	// The captured scripts cd to their project dir.
	require.NoError(t, os.MkdirAll(filepath.Join(root, "data/builds/run-job-h/000/demo-group/demo"), 0o755))
	s := strings.ReplaceAll(string(script), capturedDataDir, filepath.Join(root, "data"))
	p := filepath.Join(root, "script")
	require.NoError(t, os.WriteFile(p, []byte(s), 0o700))
	cmd := exec.Command(bashPath(t), "--noprofile", "--norc", p)
	cmd.Env = []string{"PATH=" + bin + ":/usr/bin:/bin", "REC=" + rec, "HOME=" + root}
	cmd.Dir = root
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)

	ents, err := os.ReadDir(rec)
	require.NoError(t, err)
	var names []string
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".call") {
			names = append(names, strings.TrimSuffix(e.Name(), ".call"))
		}
	}
	sort.Slice(names, func(i, j int) bool {
		return len(names[i]) < len(names[j]) || len(names[i]) == len(names[j]) && names[i] < names[j]
	})
	var calls []helperCall
	for _, n := range names {
		b, err := os.ReadFile(filepath.Join(rec, n+".call"))
		require.NoError(t, err)
		c := helperCall{argv: strings.Split(strings.TrimSuffix(string(b), "\x00"), "\x00")}
		if tok, err := os.ReadFile(filepath.Join(rec, n+".env")); err == nil {
			c.token, c.hasToken = string(tok), true
		}
		calls = append(calls, c)
	}
	return calls
}

func argvContains(calls []helperCall, s string) bool {
	for _, c := range calls {
		for _, a := range c.argv {
			if strings.Contains(a, s) {
				return true
			}
		}
	}
	return false
}

func TestRewriteCapturedScripts(t *testing.T) {
	bash := bashPath(t)
	for name, in := range capturedScripts(t) {
		t.Run(name, func(t *testing.T) {
			res, err := Rewrite(in, []string{capturedToken})
			require.NoError(t, err)
			golden := filepath.Join("testdata", "golden", name)
			if *update {
				require.NoError(t, os.MkdirAll(filepath.Dir(golden), 0o755))
				require.NoError(t, os.WriteFile(golden, res.Script, 0o644))
			}
			want, err := os.ReadFile(golden)
			require.NoError(t, err, "run go test -update to create the goldens")
			assert.Equal(t, string(want), string(res.Script))
			require.Len(t, res.Bodies, 1, "one eval body")

			if name == "upload_artifacts_on_success.bash" {
				assert.Equal(t, 1, res.Moved)
				assert.NotContains(t, res.Bodies[0], "--token")
				assert.Contains(t, res.Bodies[0], "\n  CI_JOB_TOKEN="+capturedToken+" gitlab-runner artifacts-uploader --url $'http://127.0.0.1:44271' --id 4246 --timeout 1h0m0s ")
			} else {
				assert.Zero(t, res.Moved)
				assert.Equal(t, in, res.Script, "a script without helper tokens runs as the runner wrote it")
			}
			require.NoError(t, Check(context.Background(), bash, res.Script, res.Bodies, nil))

			again, err := Rewrite(res.Script, []string{capturedToken})
			require.NoError(t, err)
			assert.Equal(t, string(res.Script), string(again.Script), "rewriting is idempotent")
			assert.Zero(t, again.Moved)
		})
	}
}

// TestRewrittenUploadKeepsTokenOffArgv runs the captured upload script,
// before and after the rewrite, with a fake helper that records its own
// argv and environment.
func TestRewrittenUploadKeepsTokenOffArgv(t *testing.T) {
	in := capturedScripts(t)["upload_artifacts_on_success.bash"]

	before := runScript(t, in)
	require.True(t, argvContains(before, capturedToken), "the runner's own script puts the token on argv (else this test proves nothing)")

	res, err := Rewrite(in, []string{capturedToken})
	require.NoError(t, err)
	after := runScript(t, res.Script)
	require.Len(t, after, 2, "gitlab-runner --version, then the uploader")
	assert.False(t, argvContains(after, capturedToken), "no helper argv holds the token")
	up := after[1]
	assert.Equal(t, []string{"artifacts-uploader", "--url", "http://127.0.0.1:44271", "--id", "4246", "--timeout", "1h0m0s",
		"--response-header-timeout", "10m0s", "--path", "out/", "--name", "demo-artifacts", "--expire-in", "1 day",
		"--artifact-format", "zip", "--artifact-type", "archive"}, up.argv[1:], "every other argument unchanged")
	assert.True(t, up.hasToken)
	assert.Equal(t, capturedToken, up.token, "the helper gets the token from its environment")
}

// script builds a stage script the way gitlab-runner's BashWriter.Finish
// does, from body lines already quoted with q.
func script(q quoting, legacy bool, lines ...string) []byte {
	body := strings.Join(lines, "\n") + "\n"
	var b strings.Builder
	b.WriteString("#!/usr/bin/env bash\n\ntrap 'exit 1' TERM\n\n")
	b.WriteString(`case "$(set -o)" in *"pipefail"*) set -o pipefail;; esac; set -o errexit` + "\n")
	b.WriteString("set +o noclobber\n")
	if legacy {
		b.WriteString(": | eval " + q.quote(body) + "\n")
	} else {
		b.WriteString("(trap 'exit 1' TERM; eval " + q.quote(body) + ") < /dev/null\n")
	}
	b.WriteString("exit 0\n")
	return []byte(b.String())
}

// command is BashWriter.buildCommand: every word quoted with q.
func command(q quoting, words ...string) string {
	out := make([]string, len(words))
	for i, w := range words {
		out[i] = q.quote(w)
	}
	return strings.Join(out, " ")
}

func export(q quoting, k, v string) string { return "export " + q.quote(k) + "=" + q.quote(v) }

func uploader(q quoting, token string, extra ...string) string {
	return command(q, append([]string{"gitlab-runner", "artifacts-uploader", "--url", "http://127.0.0.1:1", "--token", token, "--id", "7"}, extra...)...)
}

func downloader(q quoting, token string, id string) string {
	return command(q, "gitlab-runner", "artifacts-downloader", "--url", "http://127.0.0.1:1", "--token", token, "--id", id)
}

func TestRewriteTrickyScripts(t *testing.T) {
	const tok = "glcbt-64_tricky-token-0001"
	// Characters every quoting has to escape: quotes, backslash, $, `,
	// a newline, a control byte and non-ASCII.
	const odd = "glcbt-'odd\" \\$(id) `x`\n\x01é;tok"
	const dep = "glcbt-dependency-token-77"
	for _, q := range []quoting{ansiC, posix} {
		name := map[quoting]string{ansiC: "ansi-c", posix: "posix"}[q]
		t.Run(name+"/token twice, two helpers", func(t *testing.T) {
			in := script(q, false,
				export(q, "CI_JOB_TOKEN", tok),
				uploader(q, tok, "--path", "out/"),
				downloader(q, tok, "5"),
			)
			res, err := Rewrite(in, []string{tok})
			require.NoError(t, err)
			assert.Equal(t, 2, res.Moved)
			calls := runScript(t, res.Script)
			require.Len(t, calls, 2)
			assert.False(t, argvContains(calls, tok))
			for _, c := range calls {
				assert.Equal(t, tok, c.token)
			}
			assert.Equal(t, []string{"artifacts-downloader", "--url", "http://127.0.0.1:1", "--id", "5"}, calls[1].argv[1:])
		})
		t.Run(name+"/--token=VALUE", func(t *testing.T) {
			in := script(q, false, command(q, "gitlab-runner", "artifacts-uploader", "--token="+tok, "--id", "7"))
			res, err := Rewrite(in, []string{tok})
			require.NoError(t, err)
			assert.Equal(t, 1, res.Moved)
			calls := runScript(t, res.Script)
			require.Len(t, calls, 1)
			assert.Equal(t, []string{"artifacts-uploader", "--id", "7"}, calls[0].argv[1:])
			assert.Equal(t, tok, calls[0].token)
		})
		t.Run(name+"/flag twice, the last value wins", func(t *testing.T) {
			in := script(q, false, uploader(q, dep, "--token", tok))
			res, err := Rewrite(in, []string{tok, dep})
			require.NoError(t, err)
			assert.Equal(t, 2, res.Moved)
			calls := runScript(t, res.Script)
			require.Len(t, calls, 1)
			assert.Equal(t, tok, calls[0].token)
			assert.False(t, argvContains(calls, tok) || argvContains(calls, dep))
		})
		t.Run(name+"/token that needs escaping", func(t *testing.T) {
			in := script(q, false,
				export(q, "CI_JOB_TOKEN", odd),
				"if "+command(q, "gitlab-runner", "--version")+" >/dev/null 2>&1 ; then",
				"  "+uploader(q, odd),
				"fi",
			)
			if q == posix {
				// PosixShellEscape leaves newlines and ';' unquoted; a
				// token with them would not survive the runner's own
				// quoting. Use the rest.
				in = script(q, false, export(q, "CI_JOB_TOKEN", strings.NewReplacer("\n", "", ";", "").Replace(odd)),
					uploader(q, strings.NewReplacer("\n", "", ";", "").Replace(odd)))
			}
			token := odd
			if q == posix {
				token = strings.NewReplacer("\n", "", ";", "").Replace(odd)
			}
			before := runScript(t, in)
			require.True(t, argvContains(before, token), "the unrewritten script leaks (else the test proves nothing)")
			res, err := Rewrite(in, []string{token})
			require.NoError(t, err)
			assert.Equal(t, 1, res.Moved)
			require.NoError(t, Check(context.Background(), bashPath(t), res.Script, res.Bodies, nil))
			calls := runScript(t, res.Script)
			assert.False(t, argvContains(calls, token))
			assert.Equal(t, token, calls[len(calls)-1].token, "the helper gets the exact token")
		})
		t.Run(name+"/cache helper in an if", func(t *testing.T) {
			// The runner gives the cache helpers no token today; a future
			// one that did would be rewritten the same way.
			in := script(q, false,
				"if "+command(q, "gitlab-runner", "cache-archiver", "--file", "c.zip", "--token", tok, "--path", "out/")+" ; then",
				"  echo ok",
				"fi")
			res, err := Rewrite(in, []string{tok})
			require.NoError(t, err)
			assert.Equal(t, 1, res.Moved)
			calls := runScript(t, res.Script)
			require.Len(t, calls, 1)
			assert.Equal(t, []string{"cache-archiver", "--file", "c.zip", "--path", "out/"}, calls[0].argv[1:])
			assert.Equal(t, tok, calls[0].token)
		})
		t.Run(name+"/legacy eval", func(t *testing.T) {
			in := script(q, true, uploader(q, tok))
			res, err := Rewrite(in, []string{tok})
			require.NoError(t, err)
			assert.Equal(t, 1, res.Moved)
			assert.True(t, strings.Contains(string(res.Script), "\n: | eval "))
			calls := runScript(t, res.Script)
			assert.False(t, argvContains(calls, tok))
			assert.Equal(t, tok, calls[0].token)
		})
		t.Run(name+"/token in a file variable and exports is fine", func(t *testing.T) {
			in := script(q, false,
				export(q, "CI_JOB_TOKEN", tok),
				export(q, "CI_REPOSITORY_URL", "https://gitlab-ci-token:"+tok+"@gitlab.example/g/p.git"),
				`printf '%s' `+q.quote(tok)+` > "/tmp/x.tmp/MY_FILE"`,
				`echo "user code may use $CI_JOB_TOKEN: it is not on the script's text"`,
			)
			res, err := Rewrite(in, []string{tok})
			require.NoError(t, err)
			assert.Equal(t, in, res.Script)
		})
	}
}

func TestRewriteRefuses(t *testing.T) {
	const tok = "glcbt-64_refused-token-0002"
	q := ansiC
	cases := []struct {
		name    string
		in      []byte
		outer   bool
		command string
		hint    string
	}{
		{"user line with the literal token", script(q, false, export(q, "CI_JOB_TOKEN", tok), `echo "`+tok+`"`), false, "echo", "artifact name"},
		{"git insteadOf with the token, not of the runner's shape", script(q, false,
			`git config --file "/b/p.tmp/.gitlab-runner.ext.conf" --replace-all "url.https://gitlab-ci-token:`+tok+`@gitlab.example/g/p.git.insteadOf" "https://gitlab.example/g/p.git"`),
			false, "git", "FF_GIT_URLS_WITHOUT_TOKENS = true"},
		{"token in an artifact name", script(q, false, uploader(q, tok, "--name", "a-"+tok)), false, "", "artifact name"},
		{"token outside the eval body", append([]byte("echo "+tok+"\n"), script(q, false, "true")...), true, "echo", "shape"},
		{"an eval ci-exec cannot parse", []byte("#!/usr/bin/env bash\neval \"$(printf 'gitlab-runner artifacts-uploader --token " + tok + "')\"\n"), true, "eval", "shape"},
		{"a helper --token value that is not literal text", script(q, false,
			"gitlab-runner artifacts-uploader --token \"$T\" --name "+tok), false, "gitlab-runner", "artifact name"},
		{"a heredoc with the token", script(q, false, "cat << EOF > f", "TOKEN="+tok, "EOF"), false, "", "artifact name"},
		{"an export that runs a command", script(q, false, "export X=$(curl -H "+tok+")"), false, "export", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Rewrite(tc.in, []string{tok})
			var le *LeakError
			require.True(t, errors.As(err, &le), "%v", err)
			assert.Equal(t, tc.outer, le.Outer)
			assert.Equal(t, tc.command, le.Command)
			assert.Contains(t, err.Error(), tc.hint)
			assert.NotContains(t, err.Error(), tok, "the error never shows the token")
		})
	}
}

func TestRewriteOtherValues(t *testing.T) {
	const tok = "glcbt-64_job-token-0003"
	q := ansiC
	// A helper's --token is a credential whatever its value: it moves too.
	in := script(q, false, command(q, "gitlab-runner", "artifacts-uploader", "--token", "some-other-value", "--id", "1"))
	res, err := Rewrite(in, []string{tok})
	require.NoError(t, err)
	assert.Equal(t, 1, res.Moved)
	calls := runScript(t, res.Script)
	assert.Equal(t, "some-other-value", calls[0].token)
	assert.Equal(t, []string{"artifacts-uploader", "--id", "1"}, calls[0].argv[1:])

	// Another program's --token, and a helper argument that is not literal
	// text, are the user's own business: untouched, and no error.
	in = script(q, false, `mytool --token "$MY_TOKEN"`, `gitlab-runner artifacts-uploader --token "$MY_TOKEN"`)
	res, err = Rewrite(in, []string{tok})
	require.NoError(t, err)
	assert.Equal(t, in, res.Script)

	// A value that reads "--token" is a value: the artifact keeps its name.
	in = script(q, false, command(q, "gitlab-runner", "artifacts-uploader", "--name", "--token", "--token", tok, "--untracked", "--path", "out/"))
	res, err = Rewrite(in, []string{tok})
	require.NoError(t, err)
	assert.Equal(t, 1, res.Moved)
	calls = runScript(t, res.Script)
	assert.Equal(t, []string{"artifacts-uploader", "--name", "--token", "--untracked", "--path", "out/"}, calls[0].argv[1:])
	assert.Equal(t, tok, calls[0].token)

	// A script of an unknown shape without a token runs unchanged.
	odd := []byte("#!/bin/sh\necho hello\n")
	res, err = Rewrite(odd, []string{tok})
	require.NoError(t, err)
	assert.Equal(t, odd, res.Script)
	assert.Empty(t, res.Bodies)

	// Tokens too short to recognise are still moved, never searched for.
	res, err = Rewrite(script(q, false, uploader(q, "short"), "echo short"), []string{"short"})
	require.NoError(t, err)
	assert.Equal(t, 1, res.Moved)
}

func TestCheckFindsBrokenBody(t *testing.T) {
	bash := bashPath(t)
	q := ansiC
	good := script(q, false, "if true ; then", "  echo ok", "fi")
	res, err := Rewrite(good, nil)
	require.NoError(t, err)
	require.NoError(t, Check(context.Background(), bash, res.Script, res.Bodies, nil))

	// bash -n of the outer script alone cannot see a broken eval body.
	const secret = "glcbt-64_secret-in-error"
	broken := script(q, false, "export CI_JOB_TOKEN="+secret, "if true ; then", "  echo ok")
	res, err = Rewrite(broken, []string{secret})
	require.NoError(t, err)
	require.Len(t, res.Bodies, 1)
	err = Check(context.Background(), bash, res.Script, res.Bodies, []string{secret})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "bash -n finds the rewritten script invalid")
	assert.NotContains(t, err.Error(), secret)

	err = Check(context.Background(), bash, []byte("(\n"), nil, nil)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "finds the rewritten script invalid")
}

func TestQuoteRoundTrip(t *testing.T) {
	for _, q := range []quoting{ansiC, posix} {
		for _, v := range []string{"", "plain-word_1.2/x@y,z", "a b", "it's", `back\slash`, "$HOME", "`id`", "tab\there", "é", "\x00\x7f", "--token=x"} {
			w := q.quote(v)
			got, n, ok := q.word(w + " rest")
			if q == posix && strings.ContainsAny(v, "'\t\x00\x7fé") && !strings.HasPrefix(w, `"`) {
				// PosixShellEscape leaves these unquoted; this package
				// refuses to read such words.
				continue
			}
			require.True(t, ok, "%q %q", v, w)
			assert.Equal(t, v, got)
			assert.Equal(t, len(w), n)
		}
		_, _, ok := q.word("$VAR")
		assert.False(t, ok)
	}
	// The runner's own escaper, as in its tests (helpers/shell_escape_test.go).
	assert.Equal(t, `$'\x1b[32;1mhi\x1b[0;m'`, ansiC.quote("\x1b[32;1mhi\x1b[0;m"))
	assert.Equal(t, `$'it\'s'`, ansiC.quote("it's"))
	assert.Equal(t, `"\$HOME \"x\""`, posix.quote(`$HOME "x"`))
}
