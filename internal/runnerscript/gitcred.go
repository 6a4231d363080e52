package runnerscript

// The runner's get_sources, with FF_GIT_URLS_WITHOUT_TOKENS=false (the
// default in gitlab-runner 19.4), gives git the job token through insteadOf
// rules in the job's external git config (shells/abstract.go
// setupExternalGitConfig, written with BashWriter.CommandArgExpand: the
// command escaped, every argument in plain double quotes):
//
//	git "config" "--file" "<EXT>" "--replace-all" "url.https://gitlab-ci-token:<TOKEN>@host/g/p.git.insteadOf" "https://host/g/p.git" "^https://host/g/p\.git$"
//
// The token is on that git's argv, and later on git-remote-https's when
// git applies the rule. With the flag on the runner writes the same rules
// without the credentials (dropping those that then rewrite a URL to
// itself) and, after them, its credential helper for the remote's
// scheme and host (BashWriter.SetupGitCredHelper), which reads the token
// from CI_JOB_TOKEN when git asks for it:
//
//	git config -f "<EXT>" --replace-all $'credential.https://host.helper' "" && git config -f "<EXT>" --add $'credential.https://host.helper' $'!f(){ ... echo "password=${CI_JOB_TOKEN}" ... } ; f' && git config -f "<EXT>" $'credential.https://host.username' gitlab-ci-token
//
// rewriteGitCredentials turns the first shape into the second. It touches
// only a rule whose URL carries, as gitlab-ci-token's password, exactly the
// CI_JOB_TOKEN the script exported before it (what the helper will hand
// out); any other rule that holds a token stays, and checkBody refuses the
// script.

import (
	"net/url"
	"regexp"
	"strings"
)

// credHelperCommand is gitlab-runner's credential helper (shells/abstract.go
// credHelperCommand, 19.4). echo is a builtin of git's sh: the token is in
// no argv.
const credHelperCommand = `!f(){ if [ "$1" = "get" ] ; then echo "password=${CI_JOB_TOKEN}" ; fi ; } ; f`

// credUser is the user the runner gives git with the job token.
const credUser = "gitlab-ci-token"

// exitCodeCheck is the line BashWriter.CheckForErrors writes after every
// command under FF_ENABLE_BASH_EXIT_CODE_CHECK.
const exitCodeCheck = "_runner_exit_code=$?; if [ $_runner_exit_code -ne 0 ]; then exit $_runner_exit_code; fi"

// insteadOf is one parsed runner insteadOf line.
type insteadOf struct {
	indent string
	raw    []string // the words as written
	ext    string   // the --file argument's value
	key    string   // the URL git rewrites to (url.<key>.insteadOf)
	org    string   // the URL it rewrites
}

// parseInsteadOf reads a line of exactly the shape setupExternalGitConfig
// writes. Every argument must be one bash reads literally inside double
// quotes (no $, `, \ or "), except the pattern, which must be the one the
// runner derives from the rewritten URL.
func parseInsteadOf(line string, q quoting) (insteadOf, bool) {
	rest := strings.TrimLeft(line, " ")
	io := insteadOf{indent: line[:len(line)-len(rest)]}
	git := q.quote("git") + " "
	if !strings.HasPrefix(rest, git) {
		return insteadOf{}, false
	}
	io.raw = append(io.raw, q.quote("git"))
	rest = rest[len(git):]
	var args []string
	for rest != "" {
		if rest[0] != '"' {
			return insteadOf{}, false
		}
		end := strings.IndexByte(rest[1:], '"')
		if end < 0 {
			return insteadOf{}, false
		}
		args = append(args, rest[1:1+end])
		io.raw = append(io.raw, rest[:end+2])
		rest = rest[end+2:]
		if rest != "" {
			if rest[0] != ' ' {
				return insteadOf{}, false
			}
			rest = rest[1:]
		}
	}
	if len(args) != 7 || args[0] != "config" || args[1] != "--file" || args[3] != "--replace-all" {
		return insteadOf{}, false
	}
	for _, a := range args[:6] {
		if strings.ContainsAny(a, "$`\\") {
			return insteadOf{}, false
		}
	}
	key, ok := strings.CutPrefix(args[4], "url.")
	if !ok {
		return insteadOf{}, false
	}
	if key, ok = strings.CutSuffix(key, ".insteadOf"); !ok || key == "" {
		return insteadOf{}, false
	}
	io.ext, io.key, io.org = args[2], key, args[5]
	if args[6] != "^"+regexp.QuoteMeta(io.org)+"$" {
		return insteadOf{}, false
	}
	return io, true
}

// line writes io back with key as the rewrite target.
func (io insteadOf) line(key string) string {
	w := append([]string(nil), io.raw...)
	w[5] = `"url.` + key + `.insteadOf"`
	return io.indent + strings.Join(w, " ")
}

// withoutCredentials returns key with its user info removed (the text
// itself, so the rest of the URL stays byte for byte what the runner
// wrote), the scheme and host the credential helper is for, and whether
// key carries credHelper's user with password token.
func withoutCredentials(key, token string) (stripped, host string, ok bool) {
	u, err := url.Parse(key)
	if err != nil || u.Scheme != "http" && u.Scheme != "https" || u.User == nil || u.Opaque != "" {
		return "", "", false
	}
	if pw, set := u.User.Password(); !set || pw != token || u.User.Username() != credUser {
		return "", "", false
	}
	scheme, rest, ok := strings.Cut(key, "://")
	if !ok {
		return "", "", false
	}
	authority := rest
	if i := strings.IndexAny(rest, "/?#"); i >= 0 {
		authority = rest[:i]
	}
	at := strings.LastIndexByte(authority, '@')
	if at < 0 {
		return "", "", false
	}
	stripped = scheme + "://" + rest[at+1:]
	v, err := url.Parse(stripped)
	if err != nil || v.User != nil || v.Host != u.Host || v.Host == "" {
		return "", "", false
	}
	// url_helpers.OnlySchemeAndHost, as the runner names the section.
	return stripped, (&url.URL{Scheme: u.Scheme, Host: u.Host}).String(), true
}

// credHelperLine is BashWriter.SetupGitCredHelper for the section
// credential.<host> in ext (extRaw is the --file word as the runner wrote
// it: doubleQuote(confFile), the same in both places).
func credHelperLine(indent, extRaw, host string, q quoting) string {
	section := "credential." + host
	helper, user := q.quote(section+".helper"), q.quote(section+".username")
	return indent + "git config -f " + extRaw + " --replace-all " + helper + ` ""` +
		" && git config -f " + extRaw + " --add " + helper + " " + q.quote(credHelperCommand) +
		" && git config -f " + extRaw + " " + user + " " + credUser
}

// exportedToken returns the value of an `export CI_JOB_TOKEN=WORD` line at
// the body's top level.
func exportedToken(line string, q quoting) (string, bool) {
	rest, ok := strings.CutPrefix(line, "export "+q.quote(TokenEnv)+"=")
	if !ok {
		return "", false
	}
	v, n, ok := q.word(rest)
	if !ok || n != len(rest) {
		return "", false
	}
	return v, true
}

// rewriteGitCredentials replaces the job-token insteadOf rules of body as
// described above and returns the new body and how many rules it rewrote.
// Only CI_JOB_TOKEN's value can be served by the helper: a rule with a
// dependency's token, or any other, is left for checkBody to judge.
func rewriteGitCredentials(body string, q quoting) (string, int) {
	if !strings.Contains(body, ".insteadOf") {
		return body, 0
	}
	lines := strings.Split(body, "\n")
	out := make([]string, 0, len(lines))
	jobToken, haveToken := "", false
	rewritten := 0
	type helperKey struct{ ext, host string }
	emitted := map[helperKey]bool{}
	seen := map[[3]string]bool{} // the rules written, as FF-on dedupes them

	// The run of insteadOf lines being read: the helper setup goes after
	// it, where the runner writes it with the flag on.
	var pending []helperKey
	var pendingIndent, pendingExtRaw string
	pendingCheck := false
	flush := func() {
		for _, k := range pending {
			if emitted[k] {
				continue
			}
			emitted[k] = true
			out = append(out, credHelperLine(pendingIndent, pendingExtRaw, k.host, q))
			if pendingCheck {
				out = append(out, pendingIndent+exitCodeCheck)
			}
		}
		pending, pendingCheck = nil, false
	}

	for i := 0; i < len(lines); i++ {
		line := lines[i]
		if v, ok := exportedToken(line, q); ok {
			jobToken, haveToken = v, true
		}
		io, ok := parseInsteadOf(line, q)
		if !ok {
			flush()
			out = append(out, line)
			continue
		}
		if len(pending) > 0 && (io.indent != pendingIndent || io.raw[3] != pendingExtRaw) {
			flush()
		}
		// The exit code check the runner writes after the command belongs to it.
		check := i+1 < len(lines) && lines[i+1] == io.indent+exitCodeCheck
		stripped, host, ok := "", "", false
		if haveToken && len(jobToken) > 0 {
			stripped, host, ok = withoutCredentials(io.key, jobToken)
		}
		if !ok {
			// Not the runner's job-token rule: as it is (checkBody
			// decides whether it may stay).
			seen[[3]string{io.ext, io.key, io.org}] = true
			out = append(out, line)
			if check {
				out = append(out, lines[i+1])
				i++
			}
			continue
		}
		rewritten++
		pendingIndent, pendingExtRaw = io.indent, io.raw[3]
		pendingCheck = pendingCheck || check
		pending = append(pending, helperKey{io.ext, host})
		rule := [3]string{io.ext, stripped, io.org}
		if stripped != io.org && !seen[rule] {
			// A rule that still rewrites (GIT_SUBMODULE_FORCE_HTTPS: ssh
			// URLs to https) stays, without the credentials.
			seen[rule] = true
			out = append(out, io.line(stripped))
			if check {
				out = append(out, lines[i+1])
			}
		}
		if check {
			i++
		}
	}
	flush()
	if rewritten == 0 {
		return body, 0
	}
	return strings.Join(out, "\n"), rewritten
}
