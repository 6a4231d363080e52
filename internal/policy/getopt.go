package policy

import (
	"fmt"
	"strings"
)

// Option is one option Parse found.
type Option struct {
	// Flag is the table's entry for it.
	Flag Flag
	// Written is the flag as the user wrote it ("-N", "--nodes").
	Written string
}

// ParseErrorKind says why a word list cannot be used.
type ParseErrorKind int

const (
	// NotAFlag: a positional word, "-" or "--": it would become the
	// program's own argument (a runtime's image, sbatch's script).
	NotAFlag ParseErrorKind = iota
	// UnknownFlag: not in the table (abbreviations of long flags
	// included, which getopt_long and argp would accept).
	UnknownFlag
	// TakesNoValue: "--flag=value" for a switch.
	TakesNoValue
	// NeedsValue: the last word is a flag that takes a value.
	NeedsValue
	// ValueAttached: a flag whose value is optional, followed by a separate
	// word: the program would not take it as the value.
	ValueAttached
)

// ParseError is the first word Parse could not account for.
type ParseError struct {
	Kind ParseErrorKind
	// Word is the word or the flag as written ("foo", "--out", "-x").
	Word string
	// Next is the word after it (ValueAttached).
	Next string
}

func (e *ParseError) Error() string {
	switch e.Kind {
	case NotAFlag:
		return fmt.Sprintf("%q is not a flag", e.Word)
	case UnknownFlag:
		return e.Word + " is not a known flag"
	case TakesNoValue:
		return e.Word + " takes no value"
	case NeedsValue:
		return e.Word + " needs a value"
	default:
		return fmt.Sprintf("%s takes its value attached: %s=%s", e.Word, e.Word, e.Next)
	}
}

// Parse walks words the way getopt_long (and argp) will parse them with
// this table, and returns the options in order. It is the one option
// checker of ci-exec: user runtime arguments and sbatch options both go
// through it, so a word after a flag that takes a value is always that
// value, and anything the table cannot account for is refused rather than
// guessed at:
//
//   - "--flag=value", "--flag value" (RequiredArg), "--flag[=value]"
//     (OptionalArg: the value only attached);
//   - clusters of short flags ("-tv"); the first that takes a value
//     consumes the rest of the word ("-N2", "-koff") or, for RequiredArg at
//     the end of the word, the next word ("-N 2");
//   - no positional words, no "--", no abbreviations.
func (t FlagTable) Parse(words []string) ([]Option, error) {
	var out []Option
	for i := 0; i < len(words); i++ {
		w := words[i]
		switch {
		case w == "--" || w == "-" || !strings.HasPrefix(w, "-"):
			return nil, &ParseError{Kind: NotAFlag, Word: w}
		case strings.HasPrefix(w, "--"):
			name, _, hasValue := strings.Cut(w, "=")
			f, ok := t.long(name)
			if !ok {
				return nil, &ParseError{Kind: UnknownFlag, Word: name}
			}
			switch {
			case f.Arg == NoArg && hasValue:
				return nil, &ParseError{Kind: TakesNoValue, Word: name}
			case f.Arg == RequiredArg && !hasValue:
				if i+1 >= len(words) {
					return nil, &ParseError{Kind: NeedsValue, Word: name}
				}
				i++
			case f.Arg == OptionalArg && !hasValue && i+1 < len(words) && !strings.HasPrefix(words[i+1], "-"):
				return nil, &ParseError{Kind: ValueAttached, Word: name, Next: words[i+1]}
			}
			out = append(out, Option{Flag: f, Written: name})
		default:
			for j := 1; j < len(w); j++ {
				flag := "-" + string(w[j])
				f, ok := t.short(w[j])
				if !ok {
					return nil, &ParseError{Kind: UnknownFlag, Word: flag}
				}
				out = append(out, Option{Flag: f, Written: flag})
				if f.Arg == NoArg {
					continue
				}
				if f.Arg == RequiredArg && j == len(w)-1 {
					if i+1 >= len(words) {
						return nil, &ParseError{Kind: NeedsValue, Word: flag}
					}
					i++
				}
				break
			}
		}
	}
	return out, nil
}
