package policy

import (
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/google/shlex"

	"github.com/ci-exec/ci-exec/internal/failure"
)

// ArgKind says whether a runtime flag takes a value.
type ArgKind int

const (
	// NoArg: a switch (-t, --no-passwd).
	NoArg ArgKind = iota
	// RequiredArg: "--flag=value", "--flag value", "-fvalue" or "-f value".
	RequiredArg
	// OptionalArg: the value only in "--flag=value" form (ch-run --set-env).
	OptionalArg
)

// Flag is one option of a runtime's run command.
type Flag struct {
	// Long is the canonical name, with dashes ("--private-tmp"). Flags that
	// have only a short form use it here ("-x").
	Long string
	// Short is the one-letter alias with its dash ("-t"), or "".
	Short string
	Arg   ArgKind
}

// FlagTable describes every option a runtime's run command knows, so that
// user arguments can be parsed the way the runtime will parse them. A flag
// not in the table is refused: the runtime might accept it (or an
// abbreviation of a long option, as GNU argp does) and it cannot be checked.
type FlagTable []Flag

func (t FlagTable) long(name string) (Flag, bool) {
	for _, f := range t {
		if f.Long == name {
			return f, true
		}
	}
	return Flag{}, false
}

func (t FlagTable) short(c byte) (Flag, bool) {
	for _, f := range t {
		if len(f.Short) == 2 && f.Short[1] == c {
			return f, true
		}
	}
	return Flag{}, false
}

// Canonical maps a flag name written either way ("-t" or "--private-tmp",
// with or without "=value") to its canonical long name.
func (t FlagTable) Canonical(name string) (string, bool) {
	name, _, _ = strings.Cut(name, "=")
	if f, ok := t.long(name); ok {
		return f.Long, true
	}
	if len(name) == 2 && name[0] == '-' && name[1] != '-' {
		if f, ok := t.short(name[1]); ok {
			return f.Long, true
		}
	}
	return "", false
}

// UserArgsPolicy is how a job's own runtime arguments are treated.
type UserArgsPolicy struct {
	// Variable is the job variable holding them (JACAMAR_CI_<RUNTIME>_ARGS).
	Variable string
	// Disabled is disable_user_args: the variable is ignored (with a log
	// line, so the user knows why their flags had no effect).
	Disabled bool
	// Allowed are the flags users may pass (either alias of a flag allows
	// both). Empty: Default.
	Allowed []string
	// Default is the runtime's safe default allowlist.
	Default []string
	Flags   FlagTable
	// Key names the admin's list in messages
	// ("general.charliecloud.allowed_user_args"): Jacamar passes any flag,
	// so a user moving over needs to know where the admin can allow one.
	Key string
}

// UserArgs splits the job's argument variable like a POSIX shell would
// (quotes, backslashes), without running one, and checks every flag against
// the allowlist. It returns the arguments to append to the run command and
// an optional notice for the job log. Positional words are refused: one
// would become the runtime's image argument.
func (p UserArgsPolicy) UserArgs(vars map[string]string) (args []string, notice string, err error) {
	raw, ok := vars[p.Variable]
	if !ok || strings.TrimSpace(raw) == "" {
		return nil, "", nil
	}
	if p.Disabled {
		return nil, fmt.Sprintf("%s is ignored: the admin has disabled user arguments (disable_user_args)", p.Variable), nil
	}
	words, err := shlex.Split(raw)
	if err != nil {
		return nil, "", failure.Userf("%s: cannot split %q like a shell would (%v); check its quotes", p.Variable, raw, err)
	}
	allowed := map[string]bool{}
	list := p.Allowed
	if len(list) == 0 {
		list = p.Default
	}
	for _, a := range list {
		if c, ok := p.Flags.Canonical(a); ok {
			allowed[c] = true
		}
	}
	refuse := func(flag, why string) error {
		where := ""
		if p.Key != "" {
			where = " (the admin's " + p.Key + ")"
		}
		return failure.Userf("%s: %s %s; allowed flags are %s%s", p.Variable, flag, why, strings.Join(p.allowedNames(allowed), ", "), where)
	}
	opts, err := p.Flags.Parse(words)
	var pe *ParseError
	if errors.As(err, &pe) {
		why := map[ParseErrorKind]string{
			NotAFlag:      "is not a flag (only flags may be given here)",
			UnknownFlag:   "is not a known flag (write long flags in full)",
			TakesNoValue:  "takes no value",
			NeedsValue:    "needs a value",
			ValueAttached: "takes its value attached (" + pe.Word + "=" + pe.Next + ")",
		}[pe.Kind]
		word := pe.Word
		if pe.Kind == NotAFlag {
			word = fmt.Sprintf("%q", word)
		}
		return nil, "", refuse(word, why)
	}
	for _, o := range opts {
		if !allowed[o.Flag.Long] {
			return nil, "", refuse(o.Written, "is not allowed")
		}
	}
	return words, "", nil
}

// allowedNames lists the allowed flags with their aliases, for messages.
func (p UserArgsPolicy) allowedNames(allowed map[string]bool) []string {
	var out []string
	for _, f := range p.Flags {
		if !allowed[f.Long] {
			continue
		}
		n := f.Long
		if f.Short != "" {
			n = f.Short + "/" + f.Long
		}
		out = append(out, n)
	}
	sort.Strings(out)
	if len(out) == 0 {
		return []string{"none"}
	}
	return out
}
