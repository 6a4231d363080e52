package config

import (
	"fmt"
	"regexp"
	"regexp/syntax"
	"strings"
)

// Jacamar CI settings ci-exec does not have. Loading refuses them like any
// unknown key, but says why and what to do instead, because an admin moving
// a Jacamar configuration over meets exactly these (docs/config.md, "Moving
// from Jacamar"). Accepting and ignoring them would be worse: with
// `[auth] downscope = "sudo"` ignored, jobs would run as the runner's
// account while the admin believes they run as the GitLab user. The [auth]
// table itself, gitlab_server and jwt_env_variable are real keys (auth.go).
var jacamarTables = []struct{ prefix, hint string }{
	{"auth.logging", "ci-exec writes its audit trail with [auth] audit_log = \"syslog\" (the default) or the path of a JSON-lines file; remove [auth.logging]"},
}

var jacamarKeys = map[string]string{
	"general.custom_build_dir":      "ci-exec does not let jobs choose their builds dir (CUSTOM_CI_BUILDS_DIR); remove it",
	"general.unrestricted_cmd_line": "ci-exec has no such switch: it keeps the job token off command lines itself; remove it",
	"general.name":                  "a Jacamar setting ci-exec does not use; remove it",
	"general.root_dir_creation":     "ci-exec creates a downscoped user's data_dir itself when its parent belongs to root (docs/multi-tenant.md); remove it",
}

// jacamarHint returns why ci-exec refuses the Jacamar key k, or "".
func jacamarHint(k string) string {
	for _, t := range jacamarTables {
		if k == t.prefix || strings.HasPrefix(k, t.prefix+".") {
			return t.hint
		}
	}
	return jacamarKeys[k]
}

// unknownKeys is the one-line error for undecoded keys (sorted): a table's
// keys are left out when the table itself is unknown; keys that share a
// Jacamar hint are named together with it, the rest with the spelling hint.
func unknownKeys(keys []string) error {
	var order, tables []string
	byHint := map[string][]string{}
	for _, k := range keys {
		if underAnyTable(k, tables) {
			continue
		}
		tables = append(tables, k)
		h := jacamarHint(k)
		if h == "" {
			h = "check the spelling; see docs/config.md"
		}
		if _, ok := byHint[h]; !ok {
			order = append(order, h)
		}
		byHint[h] = append(byHint[h], k)
	}
	parts := make([]string, 0, len(order))
	for _, h := range order {
		ks := byHint[h]
		noun := "key"
		if len(ks) > 1 {
			noun = "keys"
		}
		parts = append(parts, fmt.Sprintf("unknown %s %s (%s)", noun, strings.Join(quoteAll(ks), ", "), h))
	}
	return fmt.Errorf("%s", strings.Join(parts, "; "))
}

func underAnyTable(k string, tables []string) bool {
	for _, t := range tables {
		if strings.HasPrefix(k, t+".") {
			return true
		}
	}
	return false
}

// checkAllowlistEntry checks one image_allowlist entry. ci-exec matches an
// entry against the whole image reference (^(?:entry)$), where Jacamar's
// documentation only says "match" and a Go program's regexp.MatchString
// would accept a match anywhere in it. Whole-reference matching is the safer
// reading (an unanchored `registry\.example\.com/` also admits
// `evil.example/registry.example.com/x`), so ci-exec keeps it; but the
// Jacamar prefix form `^registry\.example\.com/` then matches no image at
// all, since no reference ends in "/". That entry is refused here with the
// entry that means what the admin wrote it for.
func checkAllowlistEntry(e string) error {
	if _, err := regexp.Compile(e); err != nil {
		return fmt.Errorf("invalid regular expression %s: %v", tomlLiteral(e), err)
	}
	re, err := syntax.Parse(e, syntax.Perl)
	if err != nil {
		return fmt.Errorf("invalid regular expression %s: %v", tomlLiteral(e), err)
	}
	r, ok := lastRune(re)
	if !ok || !strings.ContainsRune("/:@", r) {
		return nil
	}
	fix := "write " + tomlLiteral(widen(e))
	if re.Op == syntax.OpAlternate {
		fix = "end each alternative with \".*\""
	}
	return fmt.Errorf("%s matches no image: ci-exec matches an entry against the whole image reference, not a part of it as Jacamar may, and no reference ends in %q; %s to allow the images it starts", tomlLiteral(e), string(r), fix)
}

// tomlLiteral quotes a regular expression the way an admin writes it in the
// file: a TOML literal string keeps backslashes as they are.
func tomlLiteral(e string) string {
	if strings.ContainsAny(e, "'\n") {
		return fmt.Sprintf("%q", e)
	}
	return "'" + e + "'"
}

// widen appends ".*" to an entry, before a final "$".
func widen(e string) string {
	if strings.HasSuffix(e, "$") && !strings.HasSuffix(e, `\$`) {
		return e[:len(e)-1] + ".*$"
	}
	return e + ".*"
}

// lastRune returns the character every match of re ends with, when re
// ends in a literal (ignoring empty-width assertions such as "$").
func lastRune(re *syntax.Regexp) (rune, bool) {
	switch re.Op {
	case syntax.OpLiteral:
		if len(re.Rune) > 0 {
			return re.Rune[len(re.Rune)-1], true
		}
	case syntax.OpCapture:
		return lastRune(re.Sub[0])
	case syntax.OpConcat:
		for i := len(re.Sub) - 1; i >= 0; i-- {
			switch re.Sub[i].Op {
			case syntax.OpEndText, syntax.OpEndLine, syntax.OpBeginText, syntax.OpBeginLine,
				syntax.OpWordBoundary, syntax.OpNoWordBoundary, syntax.OpEmptyMatch:
				continue
			}
			return lastRune(re.Sub[i])
		}
	case syntax.OpAlternate:
		var last rune
		for i, sub := range re.Sub {
			r, ok := lastRune(sub)
			if !ok || (i > 0 && r != last) {
				return 0, false
			}
			last = r
		}
		return last, len(re.Sub) > 0
	}
	return 0, false
}
