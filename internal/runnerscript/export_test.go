package runnerscript

// EvalBodies returns the decoded eval bodies of script, unchanged (for the
// external tests).
func EvalBodies(script []byte) []string {
	var out []string
	s := string(script)
	for pos := 0; pos < len(s); {
		if ev, n, ok := parseEval(s[pos:]); ok {
			out = append(out, ev.body)
			pos += n
			continue
		}
		n := len(s) - pos
		if i := indexNewline(s[pos:]); i >= 0 {
			n = i + 1
		}
		pos += n
	}
	return out
}

func indexNewline(s string) int {
	for i := 0; i < len(s); i++ {
		if s[i] == '\n' {
			return i
		}
	}
	return -1
}
