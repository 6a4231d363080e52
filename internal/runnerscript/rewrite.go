// Package runnerscript rewrites the stage scripts gitlab-runner hands to a
// custom executor so that the job token never reaches a command line.
//
// The runner's bash writer (shells/bash.go, 19.4) wraps a stage's whole body
// in one quoted string that a fixed preamble evals:
//
//	#!/usr/bin/env bash
//
//	trap 'exit 1' TERM
//
//	case "$(set -o)" in *"pipefail"*) set -o pipefail;; esac; set -o errexit
//	set +o noclobber
//	(trap 'exit 1' TERM; eval $'export CI_JOB_TOKEN=...\n...') < /dev/null
//	exit 0
//
// Inside that body the helper calls put the job token on the helper's argv:
//
//	gitlab-runner artifacts-uploader --url $'http://...' --token glcbt-... --id 4246 ...
//
// and any user of the host can read it in ps. The helper also reads the
// token from CI_JOB_TOKEN (gitlab-runner common/network.go JobCredentials:
// `long:"token" env:"CI_JOB_TOKEN"`), so Rewrite drops the flag and puts the
// value in an assignment in front of the command instead:
//
//	CI_JOB_TOKEN=glcbt-... gitlab-runner artifacts-uploader --url $'http://...' --id 4246 ...
//
// which bash passes in that one process's environment (readable only by the
// job user and root), never in its argv. The assignment carries exactly the
// value the runner wrote, so a CI_JOB_TOKEN the job changed through
// GITLAB_ENV does not change what the helper uses.
//
// The runner's get_sources, unless FF_GIT_URLS_WITHOUT_TOKENS is on, also
// hands git the token, in insteadOf rules of the job's git config (git
// config url.<URL with token>.insteadOf ...). Rewrite replaces them with
// what the runner writes when the flag is on: the same rules without the
// token and the runner's credential helper, which gives git the token from
// CI_JOB_TOKEN (gitcred.go).
//
// After the rewrite a token may appear only where no program receives it as
// an argument: in the exports of the job's variables (the export builtin),
// in the printf that writes a file variable (a builtin), and in the new
// assignments. Anywhere else Rewrite fails: ci-exec refuses to run a stage
// that would leak the token rather than run it and hope.
package runnerscript

import (
	"fmt"
	"path"
	"strings"
)

// MinTokenLen is the shortest token Rewrite looks for outside the helper
// calls: a shorter string cannot be told from ordinary script text (GitLab
// job tokens are far longer; masked variables need 8 characters).
const MinTokenLen = 8

// TokenEnv is the variable the runner's helpers read the job token from.
const TokenEnv = "CI_JOB_TOKEN"

// Result is a rewritten script.
type Result struct {
	// Script is the script to run: the input itself when nothing changed.
	Script []byte
	// Moved counts the --token arguments moved into the environment.
	Moved int
	// GitCredentials counts the git insteadOf rules with the job token
	// that now leave it to the runner's credential helper (gitcred.go).
	GitCredentials int
	// Bodies are the decoded eval bodies of Script (for a syntax check).
	Bodies []string
}

// Changed reports whether the script was rewritten.
func (r Result) Changed() bool { return r.Moved > 0 || r.GitCredentials > 0 }

// LeakError says where a token would still reach a command line.
type LeakError struct {
	// Line is the 1-based line in the eval body (Outer false) or in the
	// script itself (Outer true).
	Line  int
	Outer bool
	// Command is the first word of that line (never a token).
	Command string
}

func (e *LeakError) Error() string {
	where := fmt.Sprintf("line %d of its eval body", e.Line)
	if e.Outer {
		where = fmt.Sprintf("line %d, outside the runner's eval body", e.Line)
	}
	msg := fmt.Sprintf("the job token would be on a command line (%s", where)
	if e.Command != "" {
		msg += fmt.Sprintf(", command %q", e.Command)
	}
	msg += ")"
	if e.Command == "git" {
		msg += "; ci-exec moves the job token of the runner's own git insteadOf rules into git's credential helper, " +
			"but this line is not one of them: set FF_GIT_URLS_WITHOUT_TOKENS = true under [runners.feature_flags] " +
			"in the runner's config.toml so that the runner writes no token for git"
	} else if e.Outer {
		msg += "; the script does not have the shape ci-exec knows from gitlab-runner 19.x (report this with the runner's version)"
	} else {
		msg += "; ci-exec can only move the helpers' --token into the environment (is CI_JOB_TOKEN used in an artifact name, cache key or path?)"
	}
	return msg
}

// Rewrite moves every helper --token argument of script into the helper's
// environment (whatever its value: a helper's --token is a credential) and
// checks that none of tokens (the job token and the dependencies' tokens)
// is left where a program would get it as an argument. An error is a
// *LeakError.
func Rewrite(script []byte, tokens []string) (Result, error) {
	var needles1, needles2 []string
	for _, t := range tokens {
		if len(t) >= MinTokenLen {
			n1 := representations(t)
			needles1 = append(needles1, n1...)
			for _, r := range n1 {
				needles2 = append(needles2, representations(r)...)
			}
		}
	}
	needles2 = append(needles2, needles1...)

	s := string(script)
	res := Result{Script: script}
	var out strings.Builder
	changed := false
	line := 1
	for pos := 0; pos < len(s); {
		ev, n, ok := parseEval(s[pos:])
		if !ok {
			n = strings.IndexByte(s[pos:], '\n') + 1
			if n == 0 {
				n = len(s) - pos
			}
			text := s[pos : pos+n]
			if containsAny(text, needles2) {
				return Result{}, &LeakError{Line: line, Outer: true, Command: firstWord(text, needles2)}
			}
			out.WriteString(text)
			line++
			pos += n
			continue
		}
		body, moved := rewriteBody(ev.body, ev.q)
		body, creds := rewriteGitCredentials(body, ev.q)
		if err := checkBody(body, ev.q, needles2); err != nil {
			return Result{}, err
		}
		res.Bodies = append(res.Bodies, body)
		if moved == 0 && creds == 0 {
			out.WriteString(s[pos : pos+n])
		} else {
			res.Moved += moved
			res.GitCredentials += creds
			changed = true
			out.WriteString(ev.prefix + ev.q.quote(body) + ev.suffix)
		}
		line += strings.Count(s[pos:pos+n], "\n")
		pos += n
	}
	if changed {
		res.Script = []byte(out.String())
	}
	return res, nil
}

// representations are the forms a value takes in a script the runner
// quoted: itself, and what it looks like inside either style of quotes.
func representations(v string) []string {
	out := []string{v}
	for _, q := range []quoting{ansiC, posix} {
		if r := q.inner(v); r != v && r != "" {
			out = append(out, r)
		}
	}
	return out
}

func containsAny(s string, needles []string) bool {
	for _, n := range needles {
		if n != "" && strings.Contains(s, n) {
			return true
		}
	}
	return false
}

// firstWord is a line's command name for a message, unless it is itself
// secret.
func firstWord(line string, needles []string) string {
	f := strings.Fields(line)
	if len(f) == 0 {
		return ""
	}
	w := f[0]
	if w == "if" && len(f) > 1 {
		w = f[1]
	}
	if containsAny(w, needles) || strings.ContainsAny(w, "'\"$\\") || len(w) > 64 {
		return ""
	}
	return w
}

// evalLine is the line of the runner's preamble that evals the body.
type evalLine struct {
	prefix, suffix string
	body           string
	q              quoting
}

// evalForms are the ways gitlab-runner evals the body: since 18.x/19.x in
// a subshell with a TERM trap and stdin from /dev/null; with
// FF_USE_LEGACY_BASH_EVAL (and before) behind ": |".
var evalForms = []struct{ prefix, suffix string }{
	{"(trap 'exit 1' TERM; eval ", ") < /dev/null"},
	{": | eval ", ""},
}

// parseEval reads an eval statement at the start of s: the whole line (the
// quoted body may span lines under FF_POSIXLY_CORRECT_ESCAPES, which leaves
// newlines as they are) and its newline.
func parseEval(s string) (evalLine, int, bool) {
	for _, f := range evalForms {
		rest, ok := strings.CutPrefix(s, f.prefix)
		if !ok {
			continue
		}
		for _, q := range []quoting{ansiC, posix} {
			v, n, ok := q.word(rest)
			if !ok {
				continue
			}
			after, ok := strings.CutPrefix(rest[n:], f.suffix)
			if !ok || after != "" && after[0] != '\n' {
				continue
			}
			end := len(f.prefix) + n + len(f.suffix)
			suffix := f.suffix
			if after != "" {
				end++
				suffix += "\n"
			}
			return evalLine{prefix: f.prefix, suffix: suffix, body: v, q: q}, end, true
		}
	}
	return evalLine{}, 0, false
}

// helperNames are the runner's helper binary (the custom executor's
// RunnerCommand is the literal "gitlab-runner").
var helperNames = map[string]bool{"gitlab-runner": true, "gitlab-runner-helper": true}

// ifSuffixes end the helper lines the runner writes with IfCmd and
// IfCmdWithOutput; a plain Command line has none.
var ifSuffixes = []string{" >/dev/null 2>&1 ; then", " ; then"}

// rewriteBody moves the --token of every helper line into an assignment in
// front of the helper.
func rewriteBody(body string, q quoting) (string, int) {
	lines := strings.Split(body, "\n")
	moved := 0
	for i, line := range lines {
		if !strings.Contains(line, "--token") && !strings.Contains(line, "-token=") {
			continue
		}
		if nl, n := rewriteHelperLine(line, q); n > 0 {
			lines[i] = nl
			moved += n
		}
	}
	if moved == 0 {
		return body, 0
	}
	return strings.Join(lines, "\n"), moved
}

type word struct {
	raw, val string
}

// splitCommand parses one command line as the runner's writer builds it:
// indentation, an optional "if ", words joined by single spaces, and an
// optional if-suffix. ok is false for anything else.
func splitCommand(line string, q quoting) (indent, ifKw string, words []word, suffix string, ok bool) {
	rest := strings.TrimLeft(line, " ")
	indent = line[:len(line)-len(rest)]
	if r, ok := strings.CutPrefix(rest, "if "); ok {
		ifKw, rest = "if ", r
	}
	for {
		v, n, ok := q.word(rest)
		if !ok {
			return "", "", nil, "", false
		}
		words = append(words, word{raw: rest[:n], val: v})
		rest = rest[n:]
		if rest == "" {
			break
		}
		if ifKw != "" && isIfSuffix(rest) {
			suffix = rest
			break
		}
		if rest[0] != ' ' {
			return "", "", nil, "", false
		}
		rest = rest[1:]
	}
	if ifKw != "" && suffix == "" {
		return "", "", nil, "", false
	}
	return indent, ifKw, words, suffix, true
}

func isIfSuffix(s string) bool {
	for _, x := range ifSuffixes {
		if s == x {
			return true
		}
	}
	return false
}

// helperBoolFlags are the helpers' flags that take no value (gitlab-runner
// 19.4 commands/helpers). Every other --flag takes the next word, so a
// value that happens to read "--token" (an artifact called that) is never
// taken for the flag. A boolean flag added later would swallow the word
// after it: the token then stays where it was and checkBody refuses the
// script, which is the safe way to be wrong.
var helperBoolFlags = map[string]bool{"--untracked": true, "--verbose": true, "--direct-download": true, "--ci-debug-trace": true}

func rewriteHelperLine(line string, q quoting) (string, int) {
	indent, ifKw, words, suffix, ok := splitCommand(line, q)
	if !ok || len(words) < 2 || !helperNames[path.Base(words[0].val)] {
		return line, 0
	}
	kept := []string{words[0].raw, words[1].raw}
	token, moved := "", 0
	for i := 2; i < len(words); i++ {
		w := words[i]
		switch v, isEq := strings.CutPrefix(w.val, "--token="); {
		case w.val == "--token" && i+1 < len(words):
			// The helper's flag parser keeps the last value of a repeated
			// flag; so does the assignment.
			token = words[i+1].val
			moved++
			i++
		case isEq:
			token = v
			moved++
		case strings.HasPrefix(w.val, "--") && !strings.Contains(w.val, "=") && !helperBoolFlags[w.val] && i+1 < len(words):
			kept = append(kept, w.raw, words[i+1].raw)
			i++
		default:
			kept = append(kept, w.raw)
		}
	}
	if moved == 0 {
		return line, 0
	}
	return indent + ifKw + TokenEnv + "=" + q.quote(token) + " " + strings.Join(kept, " ") + suffix, moved
}

// checkBody fails when a token occurs in the body anywhere but in a
// statement that hands it to no program as an argument.
func checkBody(body string, q quoting, needles []string) error {
	if len(needles) == 0 || !containsAny(body, needles) {
		return nil
	}
	line := 1
	for pos := 0; pos < len(body); {
		end, ok := allowedStatement(body[pos:], q, needles)
		if !ok {
			end = strings.IndexByte(body[pos:], '\n')
			if end < 0 {
				end = len(body) - pos
			}
			stmt := body[pos : pos+end]
			if containsAny(stmt, needles) {
				return &LeakError{Line: line, Command: firstWord(stmt, needles)}
			}
			if pos+end < len(body) {
				end++ // the newline
			}
		}
		line += strings.Count(body[pos:pos+end], "\n")
		pos += end
	}
	return nil
}

// allowedStatement recognises, at the start of s, a statement the runner
// writes that may carry a secret without putting it on any argv, and
// returns its length including the newline:
//
//	export KEY=WORD                       (Variable: the export builtin)
//	printf '%s' WORD > "PATH"             (a file variable: the printf builtin)
//	[if ]CI_JOB_TOKEN=WORD gitlab-runner  (Rewrite's own assignment)
//
// The non-WORD parts must not contain a token.
func allowedStatement(s string, q quoting, needles []string) (int, bool) {
	line := s
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		line = s[:i]
	}
	rest := strings.TrimLeft(line, " ")
	indent := len(line) - len(rest)
	finish := func(consumed int, tail string) (int, bool) {
		// tail is the rest of the statement after its WORD, up to the
		// newline; it must hold no token.
		if containsAny(tail, needles) {
			return 0, false
		}
		n := consumed + len(tail)
		if n < len(s) && s[n] == '\n' {
			n++
		}
		return n, true
	}
	switch {
	case strings.HasPrefix(rest, "export "):
		kv := rest[len("export "):]
		eq := strings.IndexByte(kv, '=')
		if eq <= 0 || !isIdentifier(kv[:eq]) {
			return 0, false
		}
		start := indent + len("export ") + eq + 1
		_, n, ok := q.word(s[start:])
		if !ok {
			return 0, false
		}
		tail := restOfLine(s[start+n:])
		if tail != "" {
			return 0, false
		}
		return finish(start+n, tail)
	case strings.HasPrefix(rest, "printf '%s' "):
		start := indent + len("printf '%s' ")
		_, n, ok := q.word(s[start:])
		if !ok {
			return 0, false
		}
		tail := restOfLine(s[start+n:])
		if !strings.HasPrefix(tail, ` > "`) || !strings.HasSuffix(tail, `"`) {
			return 0, false
		}
		return finish(start+n, tail)
	}
	r := strings.TrimPrefix(rest, "if ")
	if a, ok := strings.CutPrefix(r, TokenEnv+"="); ok {
		start := len(line) - len(a)
		_, n, ok := q.word(s[start:])
		if !ok {
			return 0, false
		}
		tail := restOfLine(s[start+n:])
		cmd := strings.Fields(tail)
		if len(cmd) < 2 || !helperNames[path.Base(cmd[0])] {
			return 0, false
		}
		return finish(start+n, tail)
	}
	return 0, false
}

func restOfLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

func isIdentifier(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c == '_' || c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || i > 0 && c >= '0' && c <= '9' {
			continue
		}
		return false
	}
	return s != ""
}
