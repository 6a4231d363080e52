package gitlabci

import (
	"fmt"
	"strings"

	"github.com/goccy/go-yaml/ast"
	"github.com/goccy/go-yaml/parser"
)

// Pos is where a value was written: file (relative to the project) and line.
type Pos struct {
	File string
	Line int
}

func (p Pos) String() string {
	if p.Line == 0 {
		return p.File
	}
	return fmt.Sprintf("%s:%d", p.File, p.Line)
}

// Map is a YAML mapping that keeps its key order and where each key was
// written (so that an error can name file and line, and --list can show
// the jobs in file order).
type Map struct {
	Keys []string
	Vals map[string]any
	Pos  map[string]Pos
	// At is where the mapping itself starts.
	At Pos
}

func newMap(at Pos) *Map { return &Map{Vals: map[string]any{}, Pos: map[string]Pos{}, At: at} }

// Get returns the value of key and whether it is there.
func (m *Map) Get(key string) (any, bool) {
	if m == nil {
		return nil, false
	}
	v, ok := m.Vals[key]
	return v, ok
}

// Set sets key (appended to the key order when new).
func (m *Map) Set(key string, v any, p Pos) {
	if _, ok := m.Vals[key]; !ok {
		m.Keys = append(m.Keys, key)
	}
	m.Vals[key] = v
	m.Pos[key] = p
}

// Delete removes key.
func (m *Map) Delete(key string) {
	if _, ok := m.Vals[key]; !ok {
		return
	}
	delete(m.Vals, key)
	delete(m.Pos, key)
	for i, k := range m.Keys {
		if k == key {
			m.Keys = append(m.Keys[:i:i], m.Keys[i+1:]...)
			break
		}
	}
}

// PosOf is where key was written (the mapping's position when unknown).
func (m *Map) PosOf(key string) Pos {
	if p, ok := m.Pos[key]; ok {
		return p
	}
	return m.At
}

// clone copies m deeply (sequences and nested mappings too), so that a
// merge never changes a mapping another job shares.
func (m *Map) clone() *Map {
	c := newMap(m.At)
	for _, k := range m.Keys {
		c.Set(k, cloneValue(m.Vals[k]), m.Pos[k])
	}
	return c
}

func cloneValue(v any) any {
	switch t := v.(type) {
	case *Map:
		return t.clone()
	case []any:
		out := make([]any, len(t))
		for i, e := range t {
			out[i] = cloneValue(e)
		}
		return out
	}
	return v
}

// Ref is a !reference [job, key, ...] tag, resolved after extends: as
// GitLab does.
type Ref struct {
	Path []string
	At   Pos
}

// Scalar is a YAML scalar other than a string (number, bool, null) kept as
// written, so that VERSION: 1.10 stays "1.10".
type Scalar struct {
	Text string
	Null bool
}

// parseFile parses one YAML file into Maps, slices, strings, Scalars and
// Refs, resolving anchors, aliases and merge keys (<<) on the way. A file
// with a spec: header document (`spec:` then `---`) yields its second
// document; spec reports whether it had one.
func parseFile(name string, data []byte) (doc *Map, spec *Map, err error) {
	f, err := parser.ParseBytes(data, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %s", name, oneLine(err.Error()))
	}
	c := &converter{file: name, anchors: map[string]any{}}
	var docs []*Map
	for _, d := range f.Docs {
		if d.Body == nil {
			continue
		}
		v, err := c.convert(d.Body)
		if err != nil {
			return nil, nil, err
		}
		m, ok := v.(*Map)
		if !ok {
			if sc, isNull := v.(Scalar); isNull && sc.Null {
				continue
			}
			return nil, nil, fmt.Errorf("%s:%d: the file must be a mapping of keywords and jobs", name, line(d.Body))
		}
		docs = append(docs, m)
	}
	switch len(docs) {
	case 0:
		return newMap(Pos{File: name}), nil, nil
	case 1:
		return docs[0], nil, nil
	case 2:
		if _, ok := docs[0].Get("spec"); ok {
			s, _ := docs[0].Vals["spec"].(*Map)
			return docs[1], s, nil
		}
	}
	return nil, nil, fmt.Errorf("%s: %d YAML documents; GitLab takes one (or a spec: header and one)", name, len(docs))
}

// oneLine keeps the first line of a parser error (goccy/go-yaml adds the
// source excerpt below it).
func oneLine(s string) string {
	s, _, _ = strings.Cut(strings.TrimSpace(s), "\n")
	return s
}

type converter struct {
	file    string
	anchors map[string]any
}

func line(n ast.Node) int {
	if t := n.GetToken(); t != nil && t.Position != nil {
		return t.Position.Line
	}
	return 0
}

func (c *converter) pos(n ast.Node) Pos { return Pos{File: c.file, Line: line(n)} }

func (c *converter) convert(n ast.Node) (any, error) {
	switch t := n.(type) {
	case *ast.DocumentNode:
		return c.convert(t.Body)
	case *ast.MappingNode:
		return c.mapping(t.Values, c.pos(t))
	case *ast.MappingValueNode:
		return c.mapping([]*ast.MappingValueNode{t}, c.pos(t))
	case *ast.SequenceNode:
		out := make([]any, 0, len(t.Values))
		for _, e := range t.Values {
			v, err := c.convert(e)
			if err != nil {
				return nil, err
			}
			out = append(out, v)
		}
		return out, nil
	case *ast.AnchorNode:
		v, err := c.convert(t.Value)
		if err != nil {
			return nil, err
		}
		c.anchors[t.Name.String()] = v
		return v, nil
	case *ast.AliasNode:
		v, ok := c.anchors[t.Value.String()]
		if !ok {
			return nil, fmt.Errorf("%s:%d: alias *%s: no anchor &%s before it", c.file, line(t), t.Value, t.Value)
		}
		return cloneValue(v), nil
	case *ast.TagNode:
		tag := t.Start.Value
		switch tag {
		case "!reference":
			seq, ok := t.Value.(*ast.SequenceNode)
			if !ok {
				return nil, fmt.Errorf("%s:%d: !reference takes a list, e.g. !reference [.setup, script]", c.file, line(t))
			}
			r := Ref{At: c.pos(t)}
			for _, e := range seq.Values {
				v, err := c.convert(e)
				if err != nil {
					return nil, err
				}
				s, ok := scalarString(v)
				if !ok {
					return nil, fmt.Errorf("%s:%d: !reference takes a list of names, e.g. !reference [.setup, script]", c.file, line(t))
				}
				r.Path = append(r.Path, s)
			}
			if len(r.Path) == 0 {
				return nil, fmt.Errorf("%s:%d: !reference [] names nothing; write !reference [job, key]", c.file, line(t))
			}
			return r, nil
		case "!!str":
			v, err := c.convert(t.Value)
			if err != nil {
				return nil, err
			}
			if s, ok := scalarString(v); ok {
				return s, nil
			}
			return v, nil
		}
		// Other standard tags (!!int, !!bool, ...) change nothing that
		// matters here: the value is used as written.
		if strings.HasPrefix(tag, "!!") {
			return c.convert(t.Value)
		}
		return nil, fmt.Errorf("%s:%d: unknown YAML tag %s (GitLab knows !reference only)", c.file, line(t), tag)
	case *ast.StringNode:
		return t.Value, nil
	case *ast.LiteralNode:
		return t.Value.Value, nil
	case *ast.NullNode:
		return Scalar{Null: true}, nil
	case ast.ScalarNode:
		return Scalar{Text: t.GetToken().Value}, nil
	}
	return nil, fmt.Errorf("%s:%d: unsupported YAML node %s", c.file, line(n), n.Type())
}

func (c *converter) mapping(values []*ast.MappingValueNode, at Pos) (*Map, error) {
	m := newMap(at)
	// Keys written in the mapping win over merged ones (<<), whatever the
	// order: collect the merges first, apply them under the own keys.
	var merges []*Map
	for _, mv := range values {
		if _, ok := mv.Key.(*ast.MergeKeyNode); ok {
			v, err := c.convert(mv.Value)
			if err != nil {
				return nil, err
			}
			switch t := v.(type) {
			case *Map:
				merges = append(merges, t)
			case []any:
				for _, e := range t {
					em, ok := e.(*Map)
					if !ok {
						return nil, fmt.Errorf("%s:%d: << takes a mapping or a list of mappings", c.file, line(mv))
					}
					merges = append(merges, em)
				}
			default:
				return nil, fmt.Errorf("%s:%d: << takes a mapping or a list of mappings", c.file, line(mv))
			}
			continue
		}
		kv, err := c.convert(mv.Key)
		if err != nil {
			return nil, err
		}
		key, ok := scalarString(kv)
		if !ok {
			return nil, fmt.Errorf("%s:%d: a mapping key must be a name", c.file, line(mv))
		}
		v, err := c.convert(mv.Value)
		if err != nil {
			return nil, err
		}
		if _, dup := m.Vals[key]; dup {
			return nil, fmt.Errorf("%s:%d: key %q written twice", c.file, line(mv.Key), key)
		}
		m.Set(key, v, Pos{File: c.file, Line: line(mv.Key)})
	}
	for _, mm := range merges {
		for _, k := range mm.Keys {
			if _, own := m.Vals[k]; !own {
				m.Set(k, cloneValue(mm.Vals[k]), mm.Pos[k])
			}
		}
	}
	return m, nil
}

// scalarString is a scalar as the string GitLab would see ("" and false
// for mappings, sequences, references and null).
func scalarString(v any) (string, bool) {
	switch t := v.(type) {
	case string:
		return t, true
	case Scalar:
		if t.Null {
			return "", false
		}
		return t.Text, true
	}
	return "", false
}

// deepMerge merges over into base as GitLab merges includes and extends:
// mappings key by key, recursively; anything else (sequences too) is
// replaced. Neither argument is changed.
func deepMerge(base, over *Map) *Map {
	out := base.clone()
	for _, k := range over.Keys {
		ov := over.Vals[k]
		if bm, ok := out.Vals[k].(*Map); ok {
			if om, ok := ov.(*Map); ok {
				out.Set(k, deepMerge(bm, om), over.Pos[k])
				continue
			}
		}
		out.Set(k, cloneValue(ov), over.Pos[k])
	}
	return out
}
