// Package gitlabci reads a project's .gitlab-ci.yml and resolves one job the
// way GitLab does for what a local run needs: include: local (nested,
// globs), anchors and merge keys, extends: (multiple, nested), hidden
// jobs, !reference, default: and the old top-level defaults, inherit:,
// global and job variables:, image: (a name or name/entrypoint),
// before_script / script / after_script, services:, timeout: and
// artifacts: paths.
//
// What a local run cannot do (rules: decisions, remote includes, needs:
// artifacts, caches) becomes one note on the job, and the run goes on;
// what makes a job mean something else without it (trigger:, a matrix
// without its variables) is refused with an error that says what to do.
// GitLab's order is kept: includes are merged first, then extends:, then
// the !reference tags are resolved against the extended jobs.
package gitlabci

import (
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"
)

// DefaultFile is the pipeline file GitLab reads.
const DefaultFile = ".gitlab-ci.yml"

// Limits GitLab itself applies.
const (
	maxIncludes     = 150
	maxExtendsDepth = 11
	maxRefDepth     = 10
)

// reservedKeys are the top-level keywords that are not jobs.
var reservedKeys = map[string]bool{
	"default": true, "include": true, "stages": true, "variables": true, "workflow": true,
	"image": true, "services": true, "cache": true, "before_script": true, "after_script": true,
	"spec": true, "types": true,
}

// Config is a loaded pipeline: the merged top-level mapping of the file
// and its local includes.
type Config struct {
	root  *Map
	Notes []string
	// extended caches each top-level key after extends:.
	extended map[string]*Map
}

// Load reads file (relative to projectDir, default .gitlab-ci.yml) and its
// local includes.
func Load(projectDir, file string) (*Config, error) {
	if file == "" {
		file = DefaultFile
	}
	l := &loader{dir: projectDir, seen: map[string]bool{}}
	root, err := l.load(file, Pos{File: file})
	if err != nil {
		return nil, err
	}
	root.Delete("include")
	if _, ok := root.Get("workflow"); ok {
		l.note("%s: workflow: is not evaluated; the job runs as if the pipeline were created", root.PosOf("workflow"))
	}
	return &Config{root: root, Notes: l.notes, extended: map[string]*Map{}}, nil
}

type loader struct {
	dir   string
	seen  map[string]bool
	count int
	notes []string
}

func (l *loader) note(format string, args ...any) {
	l.notes = append(l.notes, fmt.Sprintf(format, args...))
}

// load reads one file and merges its includes under it: GitLab merges the
// included files in order, and the including file wins.
func (l *loader) load(rel string, from Pos) (*Map, error) {
	clean := path.Clean("/" + filepath.ToSlash(rel))[1:]
	if l.seen[clean] {
		return nil, fmt.Errorf("%s: include of %s again: includes must not form a loop", from, clean)
	}
	l.count++
	if l.count > maxIncludes {
		return nil, fmt.Errorf("%s: more than %d included files (GitLab's limit)", from, maxIncludes)
	}
	data, err := os.ReadFile(filepath.Join(l.dir, filepath.FromSlash(clean)))
	if err != nil {
		if os.IsNotExist(err) {
			return nil, fmt.Errorf("%s: %s does not exist in %s", from, clean, l.dir)
		}
		return nil, fmt.Errorf("%s: %w", from, err)
	}
	l.seen[clean] = true
	defer delete(l.seen, clean)
	doc, spec, err := parseFile(clean, data)
	if err != nil {
		return nil, err
	}
	if spec != nil {
		if _, ok := spec.Get("inputs"); ok {
			l.note("%s: spec:inputs are not interpolated: $[[ inputs.* ]] stays as written", clean)
		}
	}
	inc, ok := doc.Get("include")
	if !ok {
		return doc, nil
	}
	files, err := l.includes(inc, doc.PosOf("include"))
	if err != nil {
		return nil, err
	}
	merged := newMap(doc.At)
	for _, f := range files {
		m, err := l.load(f.path, f.from)
		if err != nil {
			return nil, err
		}
		m.Delete("include")
		merged = deepMerge(merged, m)
	}
	return deepMerge(merged, doc), nil
}

type includeFile struct {
	path string
	from Pos
}

// includes lists the local files an include: value names, expanding
// globs; the other kinds are noted and skipped.
func (l *loader) includes(v any, at Pos) ([]includeFile, error) {
	var items []any
	switch t := v.(type) {
	case []any:
		items = t
	default:
		items = []any{t}
	}
	var out []includeFile
	for _, it := range items {
		var local string
		switch t := it.(type) {
		case string:
			if strings.HasPrefix(t, "https://") || strings.HasPrefix(t, "http://") {
				l.note("%s: include %s: remote includes are not fetched; the job runs without that file", at, t)
				continue
			}
			local = t
		case *Map:
			p := t.At
			if s, ok := t.Vals["local"]; ok {
				local, _ = scalarString(s)
				if local == "" {
					return nil, fmt.Errorf("%s: include: local: needs a file path", p)
				}
				if _, ok := t.Get("rules"); ok {
					l.note("%s: include %s: rules: are not evaluated; the file is included", p, local)
				}
				if _, ok := t.Get("inputs"); ok {
					l.note("%s: include %s: inputs: are not interpolated", p, local)
				}
				break
			}
			kind := "this include"
			for _, k := range []string{"remote", "template", "project", "component"} {
				if _, ok := t.Get(k); ok {
					kind = "include: " + k
					break
				}
			}
			l.note("%s: %s is not fetched (only include: local is); the job runs without it", p, kind)
			continue
		default:
			return nil, fmt.Errorf("%s: include: takes a file path, a list, or local: PATH", at)
		}
		files, err := l.glob(local, at)
		if err != nil {
			return nil, err
		}
		for _, f := range files {
			out = append(out, includeFile{path: f, from: at})
		}
	}
	return out, nil
}

// glob expands a local include path (relative to the project root, a
// leading / allowed) the way GitLab does for * patterns.
func (l *loader) glob(p string, at Pos) ([]string, error) {
	p = strings.TrimPrefix(p, "/")
	if !strings.Contains(p, "*") {
		return []string{p}, nil
	}
	if strings.Contains(p, "**") {
		return nil, fmt.Errorf("%s: include %s: ** globs are not supported by ci-exec exec; list the files or use a single *", at, p)
	}
	matches, err := filepath.Glob(filepath.Join(l.dir, filepath.FromSlash(p)))
	if err != nil {
		return nil, fmt.Errorf("%s: include %s: %v", at, p, err)
	}
	var out []string
	for _, m := range matches {
		rel, err := filepath.Rel(l.dir, m)
		if err == nil {
			out = append(out, filepath.ToSlash(rel))
		}
	}
	if len(out) == 0 {
		l.note("%s: include %s matches no file", at, p)
	}
	return out, nil
}

// JobNames lists the jobs a pipeline could run: top-level mappings that
// are not keywords and not hidden (.name), in file order.
func (c *Config) JobNames() []string {
	var out []string
	for _, k := range c.root.Keys {
		if reservedKeys[k] || strings.HasPrefix(k, ".") {
			continue
		}
		if _, ok := c.root.Vals[k].(*Map); ok {
			out = append(out, k)
		}
	}
	return out
}

// extendedKey returns a top-level mapping with its extends: applied.
func (c *Config) extendedKey(name string, depth int, chain []string) (*Map, error) {
	if m, ok := c.extended[name]; ok {
		return m, nil
	}
	v, ok := c.root.Vals[name]
	if !ok {
		return nil, nil
	}
	m, ok := v.(*Map)
	if !ok {
		return nil, nil
	}
	ext, has := m.Get("extends")
	if !has {
		c.extended[name] = m
		return m, nil
	}
	at := m.PosOf("extends")
	if depth >= maxExtendsDepth {
		return nil, fmt.Errorf("%s: %s: extends: nested more than %d levels (GitLab's limit)", at, name, maxExtendsDepth)
	}
	var parents []string
	switch t := ext.(type) {
	case []any:
		for _, e := range t {
			s, ok := scalarString(e)
			if !ok {
				return nil, fmt.Errorf("%s: %s: extends: takes job names", at, name)
			}
			parents = append(parents, s)
		}
	default:
		s, ok := scalarString(t)
		if !ok {
			return nil, fmt.Errorf("%s: %s: extends: takes a job name or a list of them", at, name)
		}
		parents = []string{s}
	}
	base := newMap(m.At)
	for _, p := range parents {
		for _, seen := range chain {
			if seen == p {
				return nil, fmt.Errorf("%s: %s: extends: %s loops back (%s)", at, name, p, strings.Join(append(chain, p), " → "))
			}
		}
		pm, err := c.extendedKey(p, depth+1, append(chain, p))
		if err != nil {
			return nil, err
		}
		if pm == nil {
			return nil, fmt.Errorf("%s: %s: extends: %s is not a job or hidden job in the file", at, name, p)
		}
		base = deepMerge(base, pm)
	}
	own := m.clone()
	own.Delete("extends")
	out := deepMerge(base, own)
	out.Delete("extends")
	out.At = m.At
	c.extended[name] = out
	return out, nil
}

// resolveRefs replaces every !reference in v with what it names in the
// extended config; a reference to a sequence inside a sequence is spliced
// in where GitLab flattens it (scripts), kept nested elsewhere.
func (c *Config) resolveRefs(v any, depth int) (any, error) {
	switch t := v.(type) {
	case Ref:
		if depth >= maxRefDepth {
			return nil, fmt.Errorf("%s: !reference %v nested more than %d levels (GitLab's limit)", t.At, t.Path, maxRefDepth)
		}
		target, err := c.lookup(t)
		if err != nil {
			return nil, err
		}
		return c.resolveRefs(cloneValue(target), depth+1)
	case *Map:
		out := newMap(t.At)
		for _, k := range t.Keys {
			r, err := c.resolveRefs(t.Vals[k], depth)
			if err != nil {
				return nil, err
			}
			out.Set(k, r, t.Pos[k])
		}
		return out, nil
	case []any:
		out := make([]any, 0, len(t))
		for _, e := range t {
			r, err := c.resolveRefs(e, depth)
			if err != nil {
				return nil, err
			}
			out = append(out, r)
		}
		return out, nil
	}
	return v, nil
}

func (c *Config) lookup(r Ref) (any, error) {
	top, err := c.extendedKey(r.Path[0], 0, []string{r.Path[0]})
	if err != nil {
		return nil, err
	}
	var cur any = top
	if top == nil {
		if v, ok := c.root.Vals[r.Path[0]]; ok {
			cur = v
		} else {
			return nil, fmt.Errorf("%s: !reference %v: no %s in the file", r.At, r.Path, r.Path[0])
		}
	}
	for i, k := range r.Path[1:] {
		m, ok := cur.(*Map)
		if !ok {
			return nil, fmt.Errorf("%s: !reference %v: %s is not a mapping", r.At, r.Path, strings.Join(r.Path[:i+1], "."))
		}
		v, ok := m.Get(k)
		if !ok {
			return nil, fmt.Errorf("%s: !reference %v: %s has no key %s", r.At, r.Path, strings.Join(r.Path[:i+1], "."), k)
		}
		cur = v
	}
	return cur, nil
}

// Global returns a top-level keyword with extends and !reference applied
// (default:, variables:, ...); nil when absent.
func (c *Config) global(key string) (any, error) {
	v, ok := c.root.Vals[key]
	if !ok {
		return nil, nil
	}
	return c.resolveRefs(v, 0)
}
