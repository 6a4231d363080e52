package policy

import (
	"fmt"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"github.com/ci-exec/ci-exec/internal/failure"
)

// Bind is one bind mount into a container.
type Bind struct {
	// Src is the host path (absolute, symlinks resolved).
	Src string `json:"src"`
	// Dst is the container path (absolute, clean).
	Dst      string `json:"dst"`
	ReadOnly bool   `json:"ro,omitempty"`
}

// SamePath binds dir at the same path inside the container: the runner's
// scripts use absolute host paths (builds, cache, scripts dirs).
func SamePath(dir string) Bind { return Bind{Src: dir, Dst: dir} }

// VolumePolicy is what the admin allows for user volumes.
type VolumePolicy struct {
	// Table names the admin's settings in messages ("general.charliecloud").
	Table string
	// Variable is user_volume_variable; "" disables user volumes.
	Variable string
	// Prefixes are volume_prefixes: a volume's source must lie under one of
	// them after resolving symlinks. Empty: no user volumes at all.
	Prefixes []string
	// ReadOnlySupported is false for runtimes that cannot bind read-only
	// (Charliecloud 0.31): a ":ro" volume is then refused rather than
	// silently mounted writable.
	ReadOnlySupported bool
	// EvalSymlinks resolves a host path (filepath.EvalSymlinks; a seam for
	// tests).
	EvalSymlinks func(string) (string, error)
}

// UserVolumes reads the job's <Variable>_<n> variables (n = 0, 1, ...; in
// numeric order) and returns their binds. Each value is SRC[:DST][:ro|:rw].
// SRC must exist and, after resolving symlinks and "..", lie under one of
// the admin's prefixes (resolved the same way); DST must be absolute and
// clean and defaults to SRC. The first bad volume is refused with a user
// error that names the variable and says what to change.
func (p VolumePolicy) UserVolumes(vars map[string]string) ([]Bind, error) {
	if p.Variable == "" {
		return nil, nil
	}
	re := regexp.MustCompile(`^` + regexp.QuoteMeta(p.Variable) + `_([0-9]{1,4})$`)
	type entry struct {
		n    int
		name string
	}
	var entries []entry
	for k := range vars {
		if m := re.FindStringSubmatch(k); m != nil {
			n, _ := strconv.Atoi(m[1])
			entries = append(entries, entry{n, k})
		}
	}
	if len(entries) == 0 {
		return nil, nil
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].n < entries[j].n })
	if len(p.Prefixes) == 0 {
		// Jacamar binds any user volume; ci-exec only those under an admitted
		// prefix, so that a job cannot bind what its container must not see
		// (the runner account's files, ci-exec's own state).
		table := p.Table
		if table == "" {
			table = "the mechanism's table"
		}
		return nil, failure.Userf("%s: user volumes are not enabled on this runner: %s.user_volume_variable is set but %s.volume_prefixes is empty; remove the %s_* variables, or ask the admin to list the host directories volumes may come from in volume_prefixes",
			entries[0].name, table, table, p.Variable)
	}
	eval := p.EvalSymlinks
	if eval == nil {
		eval = filepath.EvalSymlinks
	}
	var prefixes []string
	for _, pre := range p.Prefixes {
		// A prefix that does not exist cannot contain anything; one that is
		// a symlink counts where it points, as volume sources do.
		if r, err := eval(filepath.Clean(pre)); err == nil {
			prefixes = append(prefixes, r)
		}
	}
	var out []Bind
	for _, e := range entries {
		b, err := parseVolume(e.name, vars[e.name], prefixes, p.ReadOnlySupported, eval)
		if err != nil {
			return nil, err
		}
		out = append(out, b)
	}
	return out, nil
}

func parseVolume(name, value string, prefixes []string, roSupported bool, eval func(string) (string, error)) (Bind, error) {
	bad := func(format string, args ...any) (Bind, error) {
		return Bind{}, failure.Userf("%s=%q: %s", name, value, fmt.Sprintf(format, args...))
	}
	parts := strings.Split(value, ":")
	var b Bind
	if n := len(parts); n >= 2 && (parts[n-1] == "ro" || parts[n-1] == "rw") {
		b.ReadOnly = parts[n-1] == "ro"
		parts = parts[:n-1]
	}
	switch len(parts) {
	case 1:
	case 2:
		b.Dst = parts[1]
	default:
		return bad("expected SRC[:DST][:ro] (paths cannot contain ':')")
	}
	src := parts[0]
	if src == "" || !filepath.IsAbs(src) {
		return bad("the source must be an absolute host path")
	}
	if b.ReadOnly && !roSupported {
		return bad("this runtime cannot mount volumes read-only; drop \":ro\" (the volume is then writable) or use another directory")
	}
	resolved, err := eval(filepath.Clean(src))
	if err != nil {
		return bad("the source does not exist or cannot be resolved on this host")
	}
	resolved = filepath.Clean(resolved)
	if !UnderAny(resolved, prefixes) {
		return bad("the source resolves to %s, which is not under an allowed volume prefix (%s); use a directory under one of them",
			resolved, strings.Join(prefixes, ", "))
	}
	b.Src = resolved
	if b.Dst == "" {
		// Same path as written by the user (not the resolved one): that is
		// where their scripts expect it.
		b.Dst = filepath.Clean(src)
	}
	if !filepath.IsAbs(b.Dst) || filepath.Clean(b.Dst) != b.Dst || b.Dst == "/" {
		return bad("the destination must be a clean absolute path other than / (no \"..\", \".\" or trailing /)")
	}
	// The runtimes mount the host's own /proc, /sys and /dev there: a mount
	// point below them would have to be made on the host.
	if UnderAny(b.Dst, []string{"/proc", "/sys", "/dev"}) {
		return bad("the destination cannot be under /proc, /sys or /dev; choose another path, e.g. /data")
	}
	return b, nil
}

// UnderAny reports whether path is one of prefixes or below one of them.
func UnderAny(path string, prefixes []string) bool {
	for _, p := range prefixes {
		if path == p || strings.HasPrefix(path, strings.TrimSuffix(p, "/")+"/") {
			return true
		}
	}
	return false
}
