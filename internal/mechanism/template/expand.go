package template

import (
	"fmt"
	"strings"

	"github.com/ci-exec/ci-exec/internal/config"
)

// values are what an action's placeholders stand for: scalars replace
// {name} inside a word, lists replace a word that is exactly {name} with
// zero or more words. Nothing is ever split or quoted: a value is one
// word, or a part of one, whatever characters it holds, because the
// result goes to execve, never to a shell.
type values struct {
	scalars map[string]string
	lists   map[string][]string
}

func (v values) with(scalars map[string]string) values {
	s := make(map[string]string, len(v.scalars)+len(scalars))
	for k, x := range v.scalars {
		s[k] = x
	}
	for k, x := range scalars {
		s[k] = x
	}
	return values{scalars: s, lists: v.lists}
}

// expand fills in an argv template. A placeholder without a value is an
// error (config validation keeps each action to its own names, so this
// means a value ci-exec could not know, e.g. a digest before the pull).
func expand(tmpl []string, v values) ([]string, error) {
	out := make([]string, 0, len(tmpl))
	for _, w := range tmpl {
		if strings.HasPrefix(w, "{") && strings.HasSuffix(w, "}") && !strings.HasPrefix(w, "{{") {
			if l, ok := v.lists[w[1:len(w)-1]]; ok {
				out = append(out, l...)
				continue
			}
		}
		s, err := expandWord(w, v.scalars)
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}

// expandWord replaces the scalar placeholders in one word; "{{" and "}}"
// are literal braces.
func expandWord(w string, scalars map[string]string) (string, error) {
	if _, err := config.TemplatePlaceholders(w); err != nil {
		return "", err
	}
	var b strings.Builder
	for i := 0; i < len(w); i++ {
		switch {
		case strings.HasPrefix(w[i:], "{{"):
			b.WriteByte('{')
			i++
		case strings.HasPrefix(w[i:], "}}"):
			b.WriteByte('}')
			i++
		case w[i] == '{':
			end := strings.IndexByte(w[i:], '}')
			name := w[i+1 : i+end]
			val, ok := scalars[name]
			if !ok {
				return "", fmt.Errorf("{%s} has no value here", name)
			}
			b.WriteString(val)
			i += end
		default:
			b.WriteByte(w[i])
		}
	}
	return b.String(), nil
}

// fragment expands a fragment once per item (each item's own scalars
// added to the common ones).
func fragment(tmpl []string, common map[string]string, items []map[string]string) ([]string, error) {
	var out []string
	for _, it := range items {
		words, err := expand(tmpl, values{scalars: values{scalars: common}.with(it).scalars})
		if err != nil {
			return nil, err
		}
		out = append(out, words...)
	}
	return out, nil
}
