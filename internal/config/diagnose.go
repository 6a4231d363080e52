package config

import (
	"errors"
	"fmt"
	"regexp"
	"sort"
	"strings"

	"github.com/BurntSushi/toml"
)

// Problem is one thing wrong with a configuration, for `ci-exec check`.
type Problem struct {
	// Key is the TOML key it is about ("general.data_dir"; "" when the
	// file does not parse at all).
	Key string
	// Line is the key's line in the file (0 when not known).
	Line int
	// Message is the one-line error, as Load would report it.
	Message string
}

func (p Problem) String() string {
	if p.Line > 0 {
		return fmt.Sprintf("line %d: %s", p.Line, p.Message)
	}
	return p.Message
}

// Diagnose is Parse that does not stop at the first kind of problem: it
// lists every unknown key and every invalid value, each with its key and
// line. The Config is nil when the document does not decode; otherwise it
// is the configuration with defaults applied (valid only when no problem
// was found).
func Diagnose(doc string, u UserInfo) (*Config, []Problem) {
	var cfg Config
	md, err := toml.Decode(doc, &cfg)
	if err != nil {
		p := Problem{Message: decodeError(err).Error()}
		var perr toml.ParseError
		if errors.As(err, &perr) {
			p.Line = perr.Position.Line
			p.Message = perr.Message
		}
		return nil, []Problem{p}
	}
	lines := keyLines(doc)
	var probs []Problem
	undecoded := md.Undecoded()
	keys := make([]string, 0, len(undecoded))
	for _, k := range undecoded {
		keys = append(keys, k.String())
	}
	sort.Strings(keys)
	var tables []string
	for _, k := range keys {
		if underAnyTable(k, tables) {
			continue
		}
		tables = append(tables, k)
		h := jacamarHint(k)
		if h == "" {
			h = "check the spelling; see docs/config.md"
		}
		probs = append(probs, Problem{Key: k, Line: lines[k], Message: fmt.Sprintf("unknown key %q (%s)", k, h)})
	}
	cfg.applyDefaults()
	cfg.siteDefaults()
	cfg.authDefaults(md.IsDefined("auth", "min_uid"))
	for _, err := range []error{cfg.expand(u), cfg.Validate()} {
		for _, e := range splitErrors(err) {
			k := keyIn(e.Error())
			probs = append(probs, Problem{Key: k, Line: lines[k], Message: e.Error()})
		}
	}
	return &cfg, probs
}

func splitErrors(err error) []error {
	if err == nil {
		return nil
	}
	var ol oneLineError
	if errors.As(err, &ol) {
		err = ol.joined
	}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

var messageKey = regexp.MustCompile(`\b((?:general|batch|auth|limits|gpu|services)(?:\.[a-z_]+)+|profiles\.[A-Za-z0-9_.-]+|runtimes(?:\.[a-z0-9_-]+)+)`)

// keyIn finds the key a validation message names ("general.data_dir must
// ..." → general.data_dir).
func keyIn(msg string) string {
	return messageKey.FindString(msg)
}

var (
	tableLine = regexp.MustCompile(`^\s*\[\s*([A-Za-z0-9_.\-" ]+?)\s*\]`)
	keyLine   = regexp.MustCompile(`^\s*([A-Za-z0-9_\-]+)\s*=`)
)

// keyLines maps each dotted key (and table) of a TOML document to the
// line it is written on. It reads only the plain forms ci-exec's
// configs use ([table] headers and key = value lines): the TOML library
// does not report key positions.
func keyLines(doc string) map[string]int {
	out := map[string]int{}
	table := ""
	for i, l := range strings.Split(doc, "\n") {
		if m := tableLine.FindStringSubmatch(l); m != nil && !strings.HasPrefix(strings.TrimSpace(l), "[[") {
			table = strings.ReplaceAll(strings.ReplaceAll(m[1], " ", ""), `"`, "")
			if _, ok := out[table]; !ok {
				out[table] = i + 1
			}
			continue
		}
		if m := keyLine.FindStringSubmatch(l); m != nil {
			k := m[1]
			if table != "" {
				k = table + "." + k
			}
			if _, ok := out[k]; !ok {
				out[k] = i + 1
			}
		}
	}
	return out
}
