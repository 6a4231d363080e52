package gitlabci

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode"
)

// Variable is one variables: entry.
type Variable struct {
	Key, Value string
	// Raw is expand: false: the value is passed as written, $ and all.
	Raw bool
}

// Image is a job's image:.
type Image struct {
	Name       string
	Entrypoint []string
}

// Service is one services: entry.
type Service struct {
	Name, Alias         string
	Entrypoint, Command []string
	// Variables are the service's own variables:, as written.
	Variables []Variable
}

// Job is one job as a local run needs it.
type Job struct {
	Name  string
	Stage string
	// Image is the job's image (Name "" for none).
	Image Image
	// Variables are the global then the job's variables (a job's own
	// entry replaces the global one of the same key), in file order.
	Variables    []Variable
	BeforeScript []string
	Script       []string
	AfterScript  []string
	Services     []Service
	// Timeout is the job's timeout: (0 when not set).
	Timeout time.Duration
	// ArtifactPaths are artifacts: paths; ArtifactsWhen their when:.
	ArtifactPaths []string
	ArtifactsWhen string
	// MatrixVars are the variable names a parallel:matrix job needs.
	MatrixVars []string
	// Notes say, one line each, what a local run leaves out.
	Notes []string
	// At is where the job is written.
	At Pos
}

// jobKeys are the job keywords GitLab knows; any other key is an error
// there, so it is here too.
var jobKeys = map[string]bool{
	"after_script": true, "allow_failure": true, "artifacts": true, "before_script": true, "cache": true,
	"coverage": true, "dast_configuration": true, "dependencies": true, "environment": true, "except": true,
	"extends": true, "hooks": true, "identity": true, "id_tokens": true, "image": true, "inherit": true,
	"interruptible": true, "manual_confirmation": true, "needs": true, "only": true, "pages": true,
	"parallel": true, "release": true, "resource_group": true, "retry": true, "rules": true, "run": true,
	"script": true, "secrets": true, "services": true, "stage": true, "start_in": true, "tags": true,
	"timeout": true, "trigger": true, "variables": true, "when": true,
}

// defaultKeys are what default: (and the old top-level keywords) give a
// job that does not set them, and that a local run uses.
var defaultKeys = []string{"image", "services", "before_script", "after_script", "timeout", "cache", "artifacts", "hooks", "id_tokens"}

// legacyDefaultKeys are the top-level keywords that act as default: entries
// (deprecated by GitLab, still honoured).
var legacyDefaultKeys = []string{"image", "services", "cache", "before_script", "after_script"}

// Job resolves the job called name.
func (c *Config) Job(name string) (*Job, error) {
	if reservedKeys[name] {
		return nil, fmt.Errorf("%s is a keyword of the file, not a job", name)
	}
	if _, ok := c.root.Vals[name]; !ok {
		return nil, fmt.Errorf("no job %q in the file (ci-exec exec --list shows the jobs)", name)
	}
	ext, err := c.extendedKey(name, 0, []string{name})
	if err != nil {
		return nil, err
	}
	if ext == nil {
		return nil, fmt.Errorf("%s: %s is not a job (a job is a mapping with script:)", c.root.PosOf(name), name)
	}
	rv, err := c.resolveRefs(ext, 0)
	if err != nil {
		return nil, err
	}
	m := rv.(*Map)
	j := &Job{Name: name, At: c.root.PosOf(name), Stage: "test"}
	note := func(p Pos, format string, args ...any) {
		j.Notes = append(j.Notes, p.String()+": "+fmt.Sprintf(format, args...))
	}
	for _, k := range m.Keys {
		if !jobKeys[k] {
			return nil, fmt.Errorf("%s: %s: unknown job keyword %s", m.PosOf(k), name, k)
		}
	}
	if strings.HasPrefix(name, ".") {
		note(j.At, "%s is a hidden job (GitLab never runs it); running it as asked", name)
	}
	if _, ok := m.Get("trigger"); ok {
		return nil, fmt.Errorf("%s: %s is a trigger job: it starts another pipeline and has no script to run locally", m.PosOf("trigger"), name)
	}

	inheritDefault, inheritVars, err := inherit(m, name)
	if err != nil {
		return nil, err
	}
	// default: and the old top-level keywords fill what the job leaves out.
	def := newMap(Pos{})
	for _, k := range legacyDefaultKeys {
		if v, err := c.global(k); err != nil {
			return nil, err
		} else if v != nil {
			def.Set(k, v, c.root.PosOf(k))
		}
	}
	if dv, err := c.global("default"); err != nil {
		return nil, err
	} else if dm, ok := dv.(*Map); ok {
		for _, k := range dm.Keys {
			def.Set(k, dm.Vals[k], dm.Pos[k])
		}
	}
	for _, k := range defaultKeys {
		if _, own := m.Get(k); own || !inheritDefault(k) {
			continue
		}
		if v, ok := def.Get(k); ok {
			m.Set(k, v, def.PosOf(k))
		}
	}

	if v, ok := m.Get("stage"); ok {
		if s, ok := scalarString(v); ok {
			j.Stage = s
		}
	}
	if j.Script, err = scriptList(m, "script", name); err != nil {
		return nil, err
	}
	if _, ok := m.Get("script"); !ok {
		return nil, fmt.Errorf("%s: %s has no script: (a job needs script: or trigger:)", j.At, name)
	}
	if len(j.Script) == 0 {
		return nil, fmt.Errorf("%s: %s: script: is empty", m.PosOf("script"), name)
	}
	if j.BeforeScript, err = scriptList(m, "before_script", name); err != nil {
		return nil, err
	}
	if j.AfterScript, err = scriptList(m, "after_script", name); err != nil {
		return nil, err
	}
	if j.Image, err = image(m, name); err != nil {
		return nil, err
	}
	if len(j.Image.Entrypoint) > 0 {
		note(m.PosOf("image"), "image:entrypoint is not used: the custom executor runs the job's scripts in a shell in the image")
	}
	if j.Services, err = services(m, name); err != nil {
		return nil, err
	}
	if v, ok := m.Get("timeout"); ok {
		s, _ := scalarString(v)
		d, err := ParseDuration(s)
		if err != nil {
			return nil, fmt.Errorf("%s: %s: timeout: %v", m.PosOf("timeout"), name, err)
		}
		j.Timeout = d
	}
	if err := artifacts(m, j, note); err != nil {
		return nil, err
	}

	// Variables: the global ones (as inherit: allows), then the job's.
	if gv, err := c.global("variables"); err != nil {
		return nil, err
	} else if gv != nil {
		vars, err := variables(gv, c.root.PosOf("variables"), "variables")
		if err != nil {
			return nil, err
		}
		for _, v := range vars {
			if inheritVars(v.Key) {
				j.Variables = append(j.Variables, v)
			}
		}
	}
	if jv, ok := m.Get("variables"); ok {
		vars, err := variables(jv, m.PosOf("variables"), name+": variables")
		if err != nil {
			return nil, err
		}
		for _, v := range vars {
			j.Variables = setVar(j.Variables, v)
		}
	}

	for _, k := range []string{"rules", "only", "except"} {
		if _, ok := m.Get(k); ok {
			note(m.PosOf(k), "%s: is not evaluated; the job runs as if it matched", k)
		}
	}
	if v, ok := m.Get("needs"); ok && needsArtifacts(v) {
		note(m.PosOf("needs"), "needs: artifacts of other jobs are not downloaded; the job starts without them")
	}
	if v, ok := m.Get("dependencies"); ok {
		if l, _ := v.([]any); len(l) > 0 {
			note(m.PosOf("dependencies"), "dependencies: artifacts of other jobs are not downloaded")
		}
	}
	if _, ok := m.Get("cache"); ok {
		note(m.PosOf("cache"), "cache: is neither restored nor saved by a local run")
	}
	for _, k := range []string{"secrets", "id_tokens"} {
		if _, ok := m.Get(k); ok {
			note(m.PosOf(k), "%s: are not provided locally; set what the job needs with --var or --env-file", k)
		}
	}
	if _, ok := m.Get("release"); ok {
		note(m.PosOf("release"), "release: is not created by a local run")
	}
	if v, ok := m.Get("parallel"); ok {
		if pm, ok := v.(*Map); ok {
			names, err := matrixVars(pm, m.PosOf("parallel"), name)
			if err != nil {
				return nil, err
			}
			j.MatrixVars = names
		} else {
			note(m.PosOf("parallel"), "parallel: runs one instance (CI_NODE_INDEX=1)")
		}
	}
	return j, nil
}

func setVar(vars []Variable, v Variable) []Variable {
	for i := range vars {
		if vars[i].Key == v.Key {
			vars[i] = v
			return vars
		}
	}
	return append(vars, v)
}

// inherit reads inherit: default: and inherit: variables: (true, false,
// or a list of names).
func inherit(m *Map, job string) (def, vars func(string) bool, err error) {
	all := func(string) bool { return true }
	def, vars = all, all
	v, ok := m.Get("inherit")
	if !ok {
		return def, vars, nil
	}
	im, ok := v.(*Map)
	if !ok {
		return nil, nil, fmt.Errorf("%s: %s: inherit: takes default: and variables:", m.PosOf("inherit"), job)
	}
	pick := func(key string) (func(string) bool, error) {
		v, ok := im.Get(key)
		if !ok {
			return all, nil
		}
		if s, ok := scalarString(v); ok {
			b, err := strconv.ParseBool(s)
			if err != nil {
				return nil, fmt.Errorf("%s: %s: inherit: %s: takes true, false or a list", im.PosOf(key), job, key)
			}
			return func(string) bool { return b }, nil
		}
		l, ok := v.([]any)
		if !ok {
			return nil, fmt.Errorf("%s: %s: inherit: %s: takes true, false or a list", im.PosOf(key), job, key)
		}
		set := map[string]bool{}
		for _, e := range l {
			s, _ := scalarString(e)
			set[s] = true
		}
		return func(k string) bool { return set[k] }, nil
	}
	if def, err = pick("default"); err != nil {
		return nil, nil, err
	}
	if vars, err = pick("variables"); err != nil {
		return nil, nil, err
	}
	return def, vars, nil
}

// scriptList reads a script keyword: a string or a list of strings,
// nested lists (from !reference) flattened as GitLab does.
func scriptList(m *Map, key, job string) ([]string, error) {
	v, ok := m.Get(key)
	if !ok {
		return nil, nil
	}
	var out []string
	var walk func(any, int) error
	walk = func(v any, depth int) error {
		if depth > maxRefDepth {
			return fmt.Errorf("%s: %s: %s: lists nested too deep", m.PosOf(key), job, key)
		}
		switch t := v.(type) {
		case []any:
			for _, e := range t {
				if err := walk(e, depth+1); err != nil {
					return err
				}
			}
			return nil
		default:
			s, ok := scalarString(t)
			if !ok {
				if sc, null := t.(Scalar); null && sc.Null {
					return nil
				}
				return fmt.Errorf("%s: %s: %s: takes shell commands (strings); quote a command that contains \": \"", m.PosOf(key), job, key)
			}
			out = append(out, s)
			return nil
		}
	}
	if err := walk(v, 0); err != nil {
		return nil, err
	}
	return out, nil
}

func image(m *Map, job string) (Image, error) {
	v, ok := m.Get("image")
	if !ok {
		return Image{}, nil
	}
	if s, ok := scalarString(v); ok {
		return Image{Name: s}, nil
	}
	im, ok := v.(*Map)
	if !ok {
		return Image{}, fmt.Errorf("%s: %s: image: takes a name or name:/entrypoint:", m.PosOf("image"), job)
	}
	var img Image
	if n, ok := im.Get("name"); ok {
		img.Name, _ = scalarString(n)
	}
	if img.Name == "" {
		return Image{}, fmt.Errorf("%s: %s: image: needs name:", m.PosOf("image"), job)
	}
	if e, ok := im.Get("entrypoint"); ok {
		l, _ := e.([]any)
		for _, x := range l {
			s, _ := scalarString(x)
			img.Entrypoint = append(img.Entrypoint, s)
		}
	}
	return img, nil
}

func services(m *Map, job string) ([]Service, error) {
	v, ok := m.Get("services")
	if !ok {
		return nil, nil
	}
	l, ok := v.([]any)
	if !ok {
		return nil, fmt.Errorf("%s: %s: services: takes a list", m.PosOf("services"), job)
	}
	var out []Service
	for _, e := range l {
		if s, ok := scalarString(e); ok {
			out = append(out, Service{Name: s})
			continue
		}
		sm, ok := e.(*Map)
		if !ok {
			return nil, fmt.Errorf("%s: %s: services: takes names or name:/alias:", m.PosOf("services"), job)
		}
		var s Service
		if n, ok := sm.Get("name"); ok {
			s.Name, _ = scalarString(n)
		}
		if a, ok := sm.Get("alias"); ok {
			s.Alias, _ = scalarString(a)
		}
		for key, dst := range map[string]*[]string{"entrypoint": &s.Entrypoint, "command": &s.Command} {
			if e, ok := sm.Get(key); ok {
				l, ok := e.([]any)
				if !ok {
					return nil, fmt.Errorf("%s: %s: services: %s: takes a list of strings", sm.PosOf(key), job, key)
				}
				for _, x := range l {
					str, _ := scalarString(x)
					*dst = append(*dst, str)
				}
			}
		}
		if v, ok := sm.Get("variables"); ok {
			vars, err := variables(v, sm.PosOf("variables"), job+": services: variables:")
			if err != nil {
				return nil, err
			}
			s.Variables = vars
		}
		out = append(out, s)
	}
	return out, nil
}

func artifacts(m *Map, j *Job, note func(Pos, string, ...any)) error {
	v, ok := m.Get("artifacts")
	if !ok {
		return nil
	}
	am, ok := v.(*Map)
	if !ok {
		return fmt.Errorf("%s: %s: artifacts: takes a mapping (paths:, when:, ...)", m.PosOf("artifacts"), j.Name)
	}
	if p, ok := am.Get("paths"); ok {
		l, ok := p.([]any)
		if !ok {
			return fmt.Errorf("%s: %s: artifacts: paths: takes a list", am.PosOf("paths"), j.Name)
		}
		for _, e := range l {
			s, ok := scalarString(e)
			if !ok {
				return fmt.Errorf("%s: %s: artifacts: paths: takes file paths", am.PosOf("paths"), j.Name)
			}
			j.ArtifactPaths = append(j.ArtifactPaths, s)
		}
	}
	if w, ok := am.Get("when"); ok {
		j.ArtifactsWhen, _ = scalarString(w)
		switch j.ArtifactsWhen {
		case "on_success", "on_failure", "always":
		default:
			return fmt.Errorf("%s: %s: artifacts: when: takes on_success, on_failure or always", am.PosOf("when"), j.Name)
		}
	}
	for _, k := range []string{"exclude", "untracked", "reports"} {
		if _, ok := am.Get(k); ok {
			note(am.PosOf(k), "artifacts: %s: is not applied locally (only paths: are copied back)", k)
		}
	}
	return nil
}

// variables reads a variables: mapping: NAME: value or NAME: {value:,
// expand:, description:, options:}.
func variables(v any, at Pos, what string) ([]Variable, error) {
	m, ok := v.(*Map)
	if !ok {
		if sc, null := v.(Scalar); null && sc.Null {
			return nil, nil
		}
		return nil, fmt.Errorf("%s: %s: takes a mapping of NAME: value", at, what)
	}
	var out []Variable
	for _, k := range m.Keys {
		if !validVarName(k) {
			return nil, fmt.Errorf("%s: %s: %q is not a variable name (letters, digits and _)", m.PosOf(k), what, k)
		}
		val := m.Vals[k]
		if s, ok := scalarString(val); ok {
			out = append(out, Variable{Key: k, Value: s})
			continue
		}
		if sc, null := val.(Scalar); null && sc.Null {
			out = append(out, Variable{Key: k})
			continue
		}
		vm, ok := val.(*Map)
		if !ok {
			return nil, fmt.Errorf("%s: %s: %s: takes a string or value:/expand:", m.PosOf(k), what, k)
		}
		vr := Variable{Key: k}
		if x, ok := vm.Get("value"); ok {
			vr.Value, _ = scalarString(x)
		}
		if x, ok := vm.Get("expand"); ok {
			s, _ := scalarString(x)
			b, err := strconv.ParseBool(s)
			if err != nil {
				return nil, fmt.Errorf("%s: %s: %s: expand: takes true or false", vm.PosOf("expand"), what, k)
			}
			vr.Raw = !b
		}
		out = append(out, vr)
	}
	return out, nil
}

func validVarName(k string) bool {
	if k == "" {
		return false
	}
	for _, r := range k {
		if r != '_' && !unicode.IsLetter(r) && !unicode.IsDigit(r) {
			return false
		}
	}
	return true
}

func needsArtifacts(v any) bool {
	l, ok := v.([]any)
	if !ok {
		return false
	}
	for _, e := range l {
		switch t := e.(type) {
		case string:
			return true
		case *Map:
			if a, ok := t.Get("artifacts"); ok {
				if s, _ := scalarString(a); s == "false" {
					continue
				}
			}
			if _, ok := t.Get("job"); ok {
				return true
			}
		}
	}
	return false
}

func matrixVars(pm *Map, at Pos, job string) ([]string, error) {
	mv, ok := pm.Get("matrix")
	if !ok {
		return nil, nil
	}
	l, ok := mv.([]any)
	if !ok {
		return nil, fmt.Errorf("%s: %s: parallel: matrix: takes a list of variable mappings", at, job)
	}
	set := map[string]bool{}
	for _, e := range l {
		if em, ok := e.(*Map); ok {
			for _, k := range em.Keys {
				set[k] = true
			}
		}
	}
	var out []string
	for k := range set {
		out = append(out, k)
	}
	sort.Strings(out)
	return out, nil
}

// ParseDuration reads a GitLab duration ("1h 30m", "90 minutes", "2h30m",
// "3600", "1 day"): numbers with units s, m, h, d, w in their short and
// long forms, a bare number being seconds.
func ParseDuration(s string) (time.Duration, error) {
	in := strings.ToLower(strings.TrimSpace(s))
	if in == "" {
		return 0, fmt.Errorf("empty duration; write e.g. 1h 30m")
	}
	if n, err := strconv.ParseFloat(in, 64); err == nil {
		return time.Duration(n * float64(time.Second)), nil
	}
	units := map[string]time.Duration{
		"s": time.Second, "sec": time.Second, "secs": time.Second, "second": time.Second, "seconds": time.Second,
		"m": time.Minute, "min": time.Minute, "mins": time.Minute, "minute": time.Minute, "minutes": time.Minute,
		"h": time.Hour, "hr": time.Hour, "hrs": time.Hour, "hour": time.Hour, "hours": time.Hour,
		"d": 24 * time.Hour, "day": 24 * time.Hour, "days": 24 * time.Hour,
		"w": 7 * 24 * time.Hour, "week": 7 * 24 * time.Hour, "weeks": 7 * 24 * time.Hour,
	}
	var total time.Duration
	rest := in
	for rest != "" {
		rest = strings.TrimLeft(rest, " ,")
		if rest == "" {
			break
		}
		if strings.HasPrefix(rest, "and ") {
			rest = rest[4:]
			continue
		}
		i := 0
		for i < len(rest) && (rest[i] >= '0' && rest[i] <= '9' || rest[i] == '.') {
			i++
		}
		if i == 0 {
			return 0, fmt.Errorf("%q is not a duration; write e.g. 1h 30m", s)
		}
		n, err := strconv.ParseFloat(rest[:i], 64)
		if err != nil {
			return 0, fmt.Errorf("%q is not a duration; write e.g. 1h 30m", s)
		}
		rest = strings.TrimLeft(rest[i:], " ")
		k := 0
		for k < len(rest) && rest[k] >= 'a' && rest[k] <= 'z' {
			k++
		}
		u, ok := units[rest[:k]]
		if !ok {
			return 0, fmt.Errorf("%q is not a duration (unit %q); write e.g. 1h 30m", s, rest[:k])
		}
		total += time.Duration(n * float64(u))
		rest = rest[k:]
	}
	return total, nil
}
