package runnerscript

import "strings"

// quoting is how the runner quoted a script's words. gitlab-runner's bash
// writer (shells/bash.go BashWriter.escape) uses helpers.ShellEscape, bash
// ANSI-C quoting ($'...'), unless the feature flag
// FF_POSIXLY_CORRECT_ESCAPES selects helpers.PosixShellEscape (double
// quotes). Both are ported here from gitlab-runner helpers/shell_escape.go
// (commit d79f3e7b, VERSION 19.4.0): the runner's helpers package cannot be
// imported (its dependencies are not on the Go module proxy).
type quoting int

const (
	ansiC quoting = iota
	posix
)

type escMode uint8

const (
	modeHex   escMode = iota // not in the table: \xHH inside $'...'
	modeLit                  // needs no quoting
	modeQuote                // forces quoting but is written as is
	modeEsc                  // written as its backslash escape
)

// ansiCTable and ansiCEsc are helpers.ShellEscape's modeTable.
var (
	ansiCTable [256]escMode
	ansiCEsc   [256]string
	posixTable [256]escMode
	posixEsc   [256]string
)

func init() {
	for c, e := range map[byte]string{'\a': `\a`, '\b': `\b`, '\t': `\t`, '\n': `\n`, '\v': `\v`, '\f': `\f`,
		'\r': `\r`, '\'': `\'`, '\\': `\\`} {
		ansiCTable[c], ansiCEsc[c] = modeEsc, e
	}
	for _, c := range []byte(",-./0123456789@ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz") {
		ansiCTable[c] = modeLit
	}
	for _, c := range []byte(" !\"#$%&()*+:;<=>?[]^`{|}~") {
		ansiCTable[c] = modeQuote
	}
	// helpers.PosixShellEscape's posixModeTable: every byte not listed is
	// written as is and does not by itself force quoting.
	for i := range posixTable {
		posixTable[i] = modeLit
	}
	for c, e := range map[byte]string{'`': "\\`", '"': `\"`, '\\': `\\`, '$': `\$`} {
		posixTable[c], posixEsc[c] = modeEsc, e
	}
	for _, c := range []byte(" !#%&()*<=>?[|") {
		posixTable[c] = modeQuote
	}
}

const hexDigits = "0123456789abcdef"

// quote is the runner's escape of s.
func (q quoting) quote(s string) string {
	if s == "" {
		return "''"
	}
	var b strings.Builder
	b.Grow(len(s) * 2)
	quoted := false
	for i := 0; i < len(s); i++ {
		c := s[i]
		if q == posix {
			switch posixTable[c] {
			case modeLit:
				b.WriteByte(c)
			case modeQuote:
				b.WriteByte(c)
				quoted = true
			default:
				b.WriteString(posixEsc[c])
				quoted = true
			}
			continue
		}
		switch ansiCTable[c] {
		case modeLit:
			b.WriteByte(c)
		case modeQuote:
			b.WriteByte(c)
			quoted = true
		case modeEsc:
			b.WriteString(ansiCEsc[c])
			quoted = true
		default:
			b.Write([]byte{'\\', 'x', hexDigits[c>>4], hexDigits[c&0x0f]})
			quoted = true
		}
	}
	if !quoted {
		return b.String()
	}
	if q == posix {
		return `"` + b.String() + `"`
	}
	return "$'" + b.String() + "'"
}

// inner is what s looks like inside the runner's quotes: the characters
// between $' and ' (or " and "), or s itself when it needs no quoting. A
// secret quoted by the runner contains this as a substring.
func (q quoting) inner(s string) string {
	w := q.quote(s)
	switch {
	case s == "":
		return ""
	case strings.HasPrefix(w, "$'"):
		return w[2 : len(w)-1]
	case strings.HasPrefix(w, `"`):
		return w[1 : len(w)-1]
	}
	return w
}

// word reads one word at the start of s exactly as quote writes it and
// returns its value and length. ok is false unless s starts with the
// canonical quoting of some value: anything else (a $VAR, a command
// substitution, a quote style the runner does not write) is not a word
// this package may touch.
func (q quoting) word(s string) (val string, n int, ok bool) {
	switch {
	case strings.HasPrefix(s, "''"):
		val, n = "", 2
	case q == ansiC && strings.HasPrefix(s, "$'"):
		val, n, ok = readANSIC(s)
		if !ok {
			return "", 0, false
		}
	case q == posix && strings.HasPrefix(s, `"`):
		val, n, ok = readPosix(s)
		if !ok {
			return "", 0, false
		}
	default:
		// Unquoted: only bytes bash takes literally. ShellEscape leaves
		// just [A-Za-z0-9,-./@_] unquoted; PosixShellEscape also ';',
		// newlines, '{', '~' and more, of which only the harmless ones are
		// accepted here (a word with the others is not one bash reads as
		// the runner meant, so this package does not touch it).
		for n < len(s) && (ansiCTable[s[n]] == modeLit || q == posix && posixPlain(s[n])) {
			n++
		}
		if n == 0 {
			return "", 0, false
		}
		val = s[:n]
	}
	if q.quote(val) != s[:n] {
		return "", 0, false
	}
	return val, n, true
}

// posixPlain reports the bytes besides ShellEscape's literals that
// PosixShellEscape writes unquoted and that bash takes literally anywhere in
// a word.
func posixPlain(c byte) bool {
	return c == '+' || c == ':' || c == ']' || c == '^' || c >= 0x80
}

// readANSIC decodes $'...' with the escapes ShellEscape writes.
func readANSIC(s string) (string, int, bool) {
	var b strings.Builder
	for i := 2; i < len(s); i++ {
		c := s[i]
		switch c {
		case '\'':
			return b.String(), i + 1, true
		case '\\':
			if i+1 >= len(s) {
				return "", 0, false
			}
			i++
			switch s[i] {
			case 'a':
				b.WriteByte('\a')
			case 'b':
				b.WriteByte('\b')
			case 't':
				b.WriteByte('\t')
			case 'n':
				b.WriteByte('\n')
			case 'v':
				b.WriteByte('\v')
			case 'f':
				b.WriteByte('\f')
			case 'r':
				b.WriteByte('\r')
			case '\'', '\\':
				b.WriteByte(s[i])
			case 'x':
				if i+2 >= len(s) {
					return "", 0, false
				}
				hi, lo := strings.IndexByte(hexDigits, s[i+1]), strings.IndexByte(hexDigits, s[i+2])
				if hi < 0 || lo < 0 {
					return "", 0, false
				}
				b.WriteByte(byte(hi<<4 | lo))
				i += 2
			default:
				return "", 0, false
			}
		default:
			b.WriteByte(c)
		}
	}
	return "", 0, false
}

// readPosix decodes "..." with the escapes PosixShellEscape writes. An
// unescaped $ or ` would be expanded by the shell: not a word.
func readPosix(s string) (string, int, bool) {
	var b strings.Builder
	for i := 1; i < len(s); i++ {
		c := s[i]
		switch c {
		case '"':
			return b.String(), i + 1, true
		case '$', '`':
			return "", 0, false
		case '\\':
			if i+1 >= len(s) || posixTable[s[i+1]] != modeEsc {
				return "", 0, false
			}
			i++
			b.WriteByte(s[i])
		default:
			b.WriteByte(c)
		}
	}
	return "", 0, false
}
