package config

// The site tables of issue 15: named profiles, resource limits, GPUs and
// services. They sit beside [general] and [batch] and are decoded and
// checked with the rest of the file.

import (
	"fmt"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"
)

// Profile is one `[profiles.NAME]` table: a vetted setup a job picks by
// name with CI_EXEC_PROFILE. Everything in it is the admin's (trusted as
// admin options are), and checked when the config loads.
type Profile struct {
	// Description is shown in the job log and in error messages.
	Description string `toml:"description"`
	// Binds are "SRC:DST[:ro]" host paths bound into the job's container.
	Binds []string `toml:"binds"`
	// Env are "KEY=VALUE" settings for the job's scripts.
	Env []string `toml:"env"`
	// Options are extra run options per runtime name ("charliecloud",
	// "apptainer"), appended to that runtime's custom_options.
	Options map[string][]string `toml:"options"`
	// SchedulerParameters are sbatch options appended to batch.options.
	SchedulerParameters []string `toml:"scheduler_parameters"`
	// GPU turns the runtime's GPU support on for the job (needs
	// [gpu] enabled).
	GPU bool `toml:"gpu"`
}

// ProfileBind is a profile's bind, parsed.
type ProfileBind struct {
	Src, Dst string
	ReadOnly bool
}

// ParseProfileBind reads "SRC:DST[:ro]" (DST defaults to SRC).
func ParseProfileBind(s string) (ProfileBind, error) {
	parts := strings.Split(s, ":")
	var b ProfileBind
	switch len(parts) {
	case 1:
		b = ProfileBind{Src: parts[0], Dst: parts[0]}
	case 2:
		b = ProfileBind{Src: parts[0], Dst: parts[1]}
	case 3:
		if parts[2] != "ro" && parts[2] != "rw" {
			return b, fmt.Errorf("%q: the third part must be \"ro\" or \"rw\"", s)
		}
		b = ProfileBind{Src: parts[0], Dst: parts[1], ReadOnly: parts[2] == "ro"}
	default:
		return b, fmt.Errorf("%q is not SRC:DST[:ro]", s)
	}
	for _, p := range []string{b.Src, b.Dst} {
		if !filepath.IsAbs(p) || filepath.Clean(p) != p || p == "/" {
			return b, fmt.Errorf("%q: both paths must be absolute, clean and not /", s)
		}
	}
	return b, nil
}

// Limits is the `[limits]` table: the admin's defaults and caps for what
// a job may ask with CI_EXEC_CPUS, CI_EXEC_MEMORY and CI_EXEC_TMP.
type Limits struct {
	DefaultCPUs   int      `toml:"default_cpus"`
	MaxCPUs       int      `toml:"max_cpus"`
	DefaultMemory ByteSize `toml:"default_memory"`
	MaxMemory     ByteSize `toml:"max_memory"`
	DefaultTmp    ByteSize `toml:"default_tmp"`
	MaxTmp        ByteSize `toml:"max_tmp"`
}

// Set reports whether the admin configured any limit.
func (l Limits) Set() bool { return l != Limits{} }

// GPU is the `[gpu]` table.
type GPU struct {
	// Enabled allows GPU jobs at all (via a profile with gpu = true, or
	// CI_EXEC_GPU when PerJob).
	Enabled bool `toml:"enabled"`
	// PerJob lets a job ask for a GPU itself with CI_EXEC_GPU=1.
	PerJob bool `toml:"per_job"`
	// Gres is the Slurm generic resource a GPU job asks for (default
	// "gpu:1").
	Gres string `toml:"gres"`
}

// Services is the `[services]` table (the job's `services:`).
type Services struct {
	// Disabled refuses jobs with services.
	Disabled bool `toml:"disabled"`
	// WaitTimeout bounds how long prepare waits for a service's ports
	// (default DefaultServiceWait).
	WaitTimeout Duration `toml:"wait_timeout"`
	// Max is the most services one job may start (default 5).
	Max int `toml:"max"`
}

// Defaults of the site tables.
const (
	DefaultServiceWait = 30 * time.Second
	DefaultMaxServices = 5
	DefaultGres        = "gpu:1"
)

var profileName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]*$`)

// Mechanisms are the run_mechanism values a profile's options may name.
var Mechanisms = []string{MechanismCharliecloud, MechanismApptainer, MechanismPodman}

func (c *Config) siteDefaults() {
	if c.Services.WaitTimeout.Duration == 0 {
		c.Services.WaitTimeout.Duration = DefaultServiceWait
	}
	if c.Services.Max == 0 {
		c.Services.Max = DefaultMaxServices
	}
	if c.GPU.Gres == "" {
		c.GPU.Gres = DefaultGres
	}
}

// ProfileNames lists the profiles, sorted.
func (c *Config) ProfileNames() []string {
	out := make([]string, 0, len(c.Profiles))
	for n := range c.Profiles {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

func (c *Config) validateSite(add func(string, ...any)) {
	for _, name := range c.ProfileNames() {
		p := c.Profiles[name]
		key := "profiles." + name
		if !profileName.MatchString(name) {
			add("%s: a profile name is letters, digits, '_', '.' and '-'", key)
		}
		for i, b := range p.Binds {
			if _, err := ParseProfileBind(b); err != nil {
				add("%s.binds[%d]: %v", key, i, err)
			}
		}
		for _, kv := range p.Env {
			k, _, ok := strings.Cut(kv, "=")
			if !ok || !envName.MatchString(k) {
				add("%s.env: %q is not KEY=VALUE", key, kv)
			}
		}
		for rt := range p.Options {
			known := false
			for _, m := range Mechanisms {
				known = known || m == rt
			}
			if !known {
				add("%s.options: %q is not a run mechanism (use %s)", key, rt, strings.Join(Mechanisms, ", "))
			}
		}
		if p.GPU && !c.GPU.Enabled {
			add("%s.gpu = true needs [gpu] enabled = true", key)
		}
	}
	l := c.Limits
	if l.DefaultCPUs < 0 || l.MaxCPUs < 0 {
		add("limits.default_cpus and limits.max_cpus must be positive")
	}
	if l.MaxCPUs > 0 && l.DefaultCPUs > l.MaxCPUs {
		add("limits.default_cpus (%d) is above limits.max_cpus (%d)", l.DefaultCPUs, l.MaxCPUs)
	}
	if l.MaxMemory.Bytes > 0 && l.DefaultMemory.Bytes > l.MaxMemory.Bytes {
		add("limits.default_memory is above limits.max_memory")
	}
	if l.MaxTmp.Bytes > 0 && l.DefaultTmp.Bytes > l.MaxTmp.Bytes {
		add("limits.default_tmp is above limits.max_tmp")
	}
	if c.Services.WaitTimeout.Duration < 0 {
		add("services.wait_timeout must be positive, got %s", c.Services.WaitTimeout.Duration)
	}
	if c.Services.Max < 0 {
		add("services.max must be positive, got %d", c.Services.Max)
	}
	if strings.ContainsAny(c.GPU.Gres, " \t=") {
		add("gpu.gres: %q is not a Slurm gres (e.g. \"gpu:1\")", c.GPU.Gres)
	}
}
