// Package config is the admin's TOML configuration: its schema, defaults and
// validation. Key names follow Jacamar CI's `[general]` table and its
// `[general.charliecloud]` run-mechanism table (seed 004) wherever they
// overlap, with the same meaning where that is as safe. Where ci-exec is
// stricter (whole-reference allowlist entries, user volumes only under
// volume_prefixes, no sudo downscoping) docs/config.md "Moving from Jacamar"
// lists the difference, and the error a Jacamar configuration meets names
// the key and the fix.
//
// Loading is strict: an unknown key is an error that names the key, because a
// typo in a security setting (say `image_alowlist`) must never pass silently,
// and neither may a Jacamar setting ci-exec does not implement (say
// `[auth] downscope = "sudo"`: the admin would believe jobs run as another
// user than they do).
package config

import (
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
)

// DefaultPath is where the runner's config_args point by default.
const DefaultPath = "/etc/ci-exec/config.toml"

// Executor names.
const (
	ExecutorShell = "shell"
	ExecutorSlurm = "slurm"
	// executorSbatch is Jacamar's other name for the Slurm executor.
	executorSbatch = "sbatch"
)

// Run mechanism names.
const (
	MechanismNone         = ""
	MechanismCharliecloud = "charliecloud"
	MechanismApptainer    = "apptainer"
	MechanismPodman       = "podman"
)

// Pull policies, as in the runner's docker executor.
const (
	PullAlways       = "always"
	PullIfNotPresent = "if-not-present"
	PullNever        = "never"
)

// Config is the whole admin configuration.
type Config struct {
	General General `toml:"general"`
	// Batch configures the scheduler when General.Executor is a batch one.
	Batch Batch `toml:"batch"`
	// Auth is the `[auth]` table: identity and the job's local account
	// (see auth.go and docs/multi-tenant.md).
	Auth Auth `toml:"auth"`
	// Profiles, Limits, GPU and Services are the site tables (site.go).
	Profiles map[string]Profile `toml:"profiles"`
	Limits   Limits             `toml:"limits"`
	GPU      GPU                `toml:"gpu"`
	Services Services           `toml:"services"`
	// Runtimes are the admin's template runtimes ([runtimes.NAME],
	// run_mechanism = "template:NAME"; see template.go).
	Runtimes map[string]*Template `toml:"runtimes"`

	// Path is the file the configuration was read from (not a TOML key).
	Path string `toml:"-"`
}

// General is the `[general]` table.
type General struct {
	// DataDir holds every job's builds, cache and scripts dirs. Required.
	// `$HOME` and `$USER` expand to the job user's.
	DataDir string `toml:"data_dir"`
	// Executor is "shell" (default) or "slurm" (Jacamar's "sbatch" is read
	// as "slurm").
	Executor string `toml:"executor"`
	// RunMechanism is "" (host), "charliecloud", "apptainer" or "podman".
	RunMechanism string `toml:"run_mechanism"`
	// ForceMechanism runs every job in a container, with DefaultImage when
	// the job names none; without a DefaultImage such a job fails (as in
	// Jacamar), it never runs on the host.
	ForceMechanism bool `toml:"force_mechanism"`
	// JobMessage is printed at the start of every prepare stage.
	JobMessage string `toml:"job_message"`
	// ShellPath is the bash used for job scripts on the host (default: bash
	// from a fixed system PATH).
	ShellPath string `toml:"shell_path"`
	// LoginShell runs host scripts as `bash --login` (sources /etc/profile,
	// e.g. for environment modules) instead of a clean non-login bash.
	LoginShell bool `toml:"login_shell"`
	// RetainLogs keeps the per-job scripts dir (copied scripts, batch output)
	// after the job for debugging, instead of removing it in cleanup.
	RetainLogs bool `toml:"retain_logs"`
	// KillTimeout is how long a stage's processes get between SIGTERM and
	// SIGKILL once the runner stops the stage. Keep it below the runner's
	// graceful_kill_timeout.
	KillTimeout Duration `toml:"kill_timeout"`
	// PassEnv lists the host (runner) environment variables that reach job
	// scripts, as names or shell globs. Default: DefaultPassEnv.
	PassEnv []string `toml:"pass_env"`
	// EnvVars are KEY=VALUE pairs set for every job script; `$VAR` in VALUE
	// expands from the runner's environment (Jacamar's env_vars).
	EnvVars []string `toml:"env_vars"`
	// GitlabServer is the trusted GitLab URL (never one from the job
	// payload): the ID token's issuer must equal it, and its keys come from
	// <gitlab_server>/oauth/discovery/keys. Trailing slashes are dropped.
	GitlabServer string `toml:"gitlab_server"`
	// JWTEnvVariable is the job variable holding the job's ID token
	// (default SITE_ID_TOKEN), declared by the job's `id_tokens:`.
	JWTEnvVariable string `toml:"jwt_env_variable"`

	// Charliecloud is the `[general.charliecloud]` table (seed 004).
	Charliecloud Mechanism `toml:"charliecloud"`
	// Apptainer is the `[general.apptainer]` table: the same keys.
	Apptainer Mechanism `toml:"apptainer"`
	// Podman is the `[general.podman]` table: the same keys, plus
	// Jacamar's runner_entry_point and user_entry_point.
	Podman Mechanism `toml:"podman"`
}

// DefaultPassEnv is what reaches job scripts from the runner's environment
// when the admin lists nothing: enough to find programs (the runner's own
// binary for cache and artifact stages) and keep the locale, and nothing that
// identifies the runner's service account or carries its secrets.
var DefaultPassEnv = []string{"PATH", "LANG", "LANGUAGE", "LC_*", "TZ", "TERM"}

// Mechanism is a `[general.<runtime>]` table. Charliecloud and Apptainer
// accept the same keys with the same meaning (seed 004's table plus the
// additions marked below).
type Mechanism struct {
	// ApplicationPath is the directory holding the runtime's programs
	// (ch-run, ch-image, ch-convert / apptainer). Empty: a fixed system PATH.
	ApplicationPath string `toml:"application_path"`
	// RunnerImage runs the runner's own stages (git, cache, artifacts);
	// empty: those run on the host.
	RunnerImage string `toml:"runner_image"`
	// RunnerOptions are extra runtime options for RunnerImage (trusted).
	RunnerOptions []string `toml:"runner_options"`
	// RunnerPullPolicy overrides PullPolicy for RunnerImage.
	RunnerPullPolicy string `toml:"runner_pull_policy"`
	// DefaultImage is used when force_mechanism is on and the job has none
	// (without it such jobs fail in prepare).
	DefaultImage string `toml:"default_image"`
	// CustomOptions are extra runtime options for the user's stages (trusted).
	CustomOptions []string `toml:"custom_options"`
	// StepScriptOnly limits containers to build_script and step_* stages;
	// after_script then runs on the host too.
	StepScriptOnly bool `toml:"step_script_only"`
	// ImageAllowlist: when set, an image must fully match one of these
	// regular expressions (Jacamar's entries may match part of a
	// reference; see checkAllowlistEntry).
	ImageAllowlist []string `toml:"image_allowlist"`
	// UserVolumeVariable is the prefix of the user's volume variables
	// (<prefix>_0, <prefix>_1, ...), each SRC[:DST][:ro].
	UserVolumeVariable string `toml:"user_volume_variable"`
	// PrepScript is an admin script run on the host, as the job user, in
	// every prepare stage (jobs with and without an image, as Jacamar's
	// prepare_exec), before any runtime command.
	PrepScript string `toml:"prep_script"`
	// PrepScriptSHA256 pins prep_script to this SHA-256 (64 hex digits):
	// the file is opened once, hashed, and that same open file is run, so a
	// changed or swapped script is never run (seed 002's signed hooks).
	PrepScriptSHA256 string `toml:"prep_script_sha256"`
	// DisableUserArgs ignores JACAMAR_CI_<RUNTIME>_ARGS.
	DisableUserArgs bool `toml:"disable_user_args"`
	// ImageStorageDir is the root of per-user image storage; "/<user>.ch"
	// (Charliecloud) or "/<user>.apptainer" is appended, as Charliecloud's
	// own default /var/tmp/$USER.ch does.
	ImageStorageDir string `toml:"image_storage_dir"`
	// DisableConvert never converts images to a single file (SquashFS/SIF).
	DisableConvert bool `toml:"disable_convert"`

	// Additions to seed 004's table.

	// PullPolicy is "always" (default; resolve the digest and reuse if
	// unchanged), "if-not-present" or "never".
	PullPolicy string `toml:"pull_policy"`
	// Convert converts images to a single file even with the shell executor
	// (batch executors always convert unless DisableConvert).
	Convert bool `toml:"convert"`
	// VolumePrefixes are the host directories under which user volumes may
	// lie (after resolving symlinks and ..). Empty: no user volumes at all.
	VolumePrefixes []string `toml:"volume_prefixes"`
	// AllowedUserArgs lists the runtime flags users may pass in their args
	// variable (e.g. "--set-env", "-t"). Empty: the safe default list.
	AllowedUserArgs []string `toml:"allowed_user_args"`
	// PassEnv lists host variables that reach the container, beyond the job's
	// own (which travel inside the runner's script). Names or globs.
	PassEnv []string `toml:"pass_env"`
	// InsecureRegistries are host[:port] registries trusted without TLS
	// verification: Charliecloud pulls with --tls-no-verify (it speaks only
	// HTTPS), Apptainer with --no-https (plain HTTP).
	InsecureRegistries []string `toml:"insecure_registries"`
	// CacheDir is the runtime's own layer cache (APPTAINER_CACHEDIR); "/<user>"
	// is appended. Default: inside the per-user storage dir.
	CacheDir string `toml:"cache_dir"`
	// TmpDir is the runtime's scratch dir (APPTAINER_TMPDIR, ch-convert
	// --tmp); "/<user>" is appended. Default: inside the per-user storage dir.
	TmpDir string `toml:"tmp_dir"`
	// CacheMaxSize bounds each user's store of converted images (SquashFS,
	// SIF); least recently used images not in use are evicted beyond it.
	// "0" or "": no limit.
	CacheMaxSize ByteSize `toml:"cache_max_size"`
	// CacheMaxAge evicts converted images unused for longer (0: never).
	CacheMaxAge Duration `toml:"cache_max_age"`
	// MaxConcurrentBuilds caps a user's concurrent image pulls and
	// conversions (default 2).
	MaxConcurrentBuilds int `toml:"max_concurrent_builds"`

	// Podman only (Jacamar's keys).

	// RunnerEntryPoint and UserEntryPoint replace the image's ENTRYPOINT
	// for runner_image and for the job's image (podman --entrypoint): an
	// absolute program and its first arguments, which must run the stage
	// command it is given as further arguments (exec "$@"). Empty: no
	// entry point at all (the image's ENTRYPOINT is never run).
	RunnerEntryPoint []string `toml:"runner_entry_point"`
	UserEntryPoint   []string `toml:"user_entry_point"`
}

// ByteSize is a size such as "512M", "20G" or a number of bytes.
type ByteSize struct{ Bytes int64 }

// UnmarshalText parses a size with an optional K, M, G or T suffix
// (powers of 1024).
func (b *ByteSize) UnmarshalText(text []byte) error {
	s := strings.TrimSpace(strings.ToUpper(string(text)))
	if s == "" {
		b.Bytes = 0 // no limit
		return nil
	}
	s = strings.TrimSuffix(strings.TrimSuffix(s, "IB"), "B")
	mult := int64(1)
	if n := len(s); n > 0 {
		switch s[n-1] {
		case 'K':
			mult = 1 << 10
		case 'M':
			mult = 1 << 20
		case 'G':
			mult = 1 << 30
		case 'T':
			mult = 1 << 40
		}
		if mult > 1 {
			s = s[:n-1]
		}
	}
	var v int64
	if _, err := fmt.Sscanf(s, "%d", &v); err != nil || v < 0 || fmt.Sprint(v) != s {
		return fmt.Errorf("not a size (use e.g. \"512M\", \"20G\" or a number of bytes): %q", string(text))
	}
	b.Bytes = v * mult
	return nil
}

// Batch is the `[batch]` table (scheduler settings; see docs/config.md).
type Batch struct {
	// SchedulerBin is the directory of sbatch, squeue, scancel, scontrol.
	SchedulerBin string `toml:"scheduler_bin"`
	// ArgumentsVariable names the user variables whose values are appended
	// to sbatch's arguments (Jacamar's arguments_variable). Default:
	// ["SCHEDULER_PARAMETERS"].
	ArgumentsVariable []string `toml:"arguments_variable"`
	// AllowedFlags, when set, are the only sbatch flags users may pass.
	AllowedFlags []string `toml:"allowed_flags"`
	// DeniedFlags are sbatch flags users may never pass (checked after
	// AllowedFlags). Default: DefaultDeniedBatchFlags.
	DeniedFlags []string `toml:"denied_flags"`
	// PendingLimit cancels a job pending longer than this (0: no limit).
	PendingLimit Duration `toml:"pending_limit"`
	// PollInterval is how often the job's state is polled.
	PollInterval Duration `toml:"poll_interval"`
	// UnknownStateLimit is how long a job may be unknown to the scheduler
	// before ci-exec gives up with a system failure.
	UnknownStateLimit Duration `toml:"unknown_state_limit"`
	// Options are admin sbatch options added to every submission (trusted).
	Options []string `toml:"options"`
	// Allocate is when the job's Slurm job is submitted: AllocatePrepare
	// (default: one allocation per CI job, submitted in prepare, every
	// user-script stage runs in it) or AllocateStage (one batch job per
	// user-script stage, submitted when the stage starts).
	Allocate string `toml:"allocate"`
	// IdleLimit ends an allocation that runs without a stage to run for
	// this long (the runner crashed, or a long stage on the login node);
	// a later stage is then submitted on its own.
	IdleLimit Duration `toml:"idle_limit"`
}

// Values of batch.allocate.
const (
	AllocatePrepare = "prepare"
	AllocateStage   = "stage"
)

// DefaultDeniedBatchFlags are sbatch flags a user may not set, because
// ci-exec owns them (output, job name, waiting) or they would run the job as
// someone or somewhere else.
var DefaultDeniedBatchFlags = []string{
	"-o", "--output", "-e", "--error", "-i", "--input", "-J", "--job-name",
	"-W", "--wait", "--uid", "--gid", "-D", "--chdir", "--export-file",
	"--wrap", "--parsable", "-H", "--hold", "--get-user-env", "--propagate",
}

// Defaults.
const (
	DefaultKillTimeout       = 30 * time.Second
	DefaultPollInterval      = 250 * time.Millisecond
	DefaultUnknownStateLimit = 60 * time.Second
	DefaultIdleLimit         = 10 * time.Minute
)

// Duration is a TOML duration string such as "30s" or "2m".
type Duration struct{ time.Duration }

// UnmarshalText parses a Go duration string; "" is the key's default.
func (d *Duration) UnmarshalText(b []byte) error {
	if strings.TrimSpace(string(b)) == "" {
		d.Duration = 0
		return nil
	}
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("not a duration (use e.g. \"30s\" or \"2m\"): %q", string(b))
	}
	d.Duration = v
	return nil
}

// MarshalText formats the duration.
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.Duration.String()), nil }

// Load reads, decodes and validates the configuration at path. The user is
// the job user whose $HOME and $USER expand in path-like keys.
func Load(path string, u UserInfo) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	cfg, err := Parse(string(b), u)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	cfg.Path = path
	return cfg, nil
}

// UserInfo is what key expansion needs to know about the job user.
type UserInfo struct {
	Name string
	Home string
}

// Parse decodes and validates a configuration document.
func Parse(doc string, u UserInfo) (*Config, error) {
	var cfg Config
	md, err := toml.Decode(doc, &cfg)
	if err != nil {
		return nil, decodeError(err)
	}
	if undecoded := md.Undecoded(); len(undecoded) > 0 {
		keys := make([]string, 0, len(undecoded))
		for _, k := range undecoded {
			keys = append(keys, k.String())
		}
		sort.Strings(keys)
		return nil, unknownKeys(keys)
	}
	cfg.applyDefaults()
	cfg.siteDefaults()
	cfg.authDefaults(md.IsDefined("auth", "min_uid"))
	if err := cfg.expand(u); err != nil {
		return nil, err
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &cfg, nil
}

func quoteAll(ss []string) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = fmt.Sprintf("%q", s)
	}
	return out
}

// decodeError turns the TOML library's errors into one line that names the
// position and, for type mismatches, the key.
func decodeError(err error) error {
	var perr toml.ParseError
	if errors.As(err, &perr) {
		msg := perr.Message
		if perr.Position.Line > 0 {
			return fmt.Errorf("line %d: %s", perr.Position.Line, msg)
		}
		return errors.New(msg)
	}
	return errors.New(strings.ReplaceAll(err.Error(), "\n", " "))
}

func (c *Config) applyDefaults() {
	g := &c.General
	switch g.Executor {
	case "":
		g.Executor = ExecutorShell
	case executorSbatch:
		g.Executor = ExecutorSlurm
	}
	if g.KillTimeout.Duration == 0 {
		g.KillTimeout.Duration = DefaultKillTimeout
	}
	if g.PassEnv == nil {
		g.PassEnv = append([]string(nil), DefaultPassEnv...)
	}
	ms := []*Mechanism{&g.Charliecloud, &g.Apptainer, &g.Podman}
	for _, t := range c.Runtimes {
		if t != nil {
			ms = append(ms, &t.Mechanism)
		}
	}
	for _, m := range ms {
		if m.PullPolicy == "" {
			m.PullPolicy = PullAlways
		}
		if m.RunnerPullPolicy == "" {
			m.RunnerPullPolicy = m.PullPolicy
		}
		m.PrepScriptSHA256 = strings.ToLower(m.PrepScriptSHA256)
	}
	b := &c.Batch
	if len(b.ArgumentsVariable) == 0 {
		b.ArgumentsVariable = []string{"SCHEDULER_PARAMETERS"}
	}
	if b.DeniedFlags == nil {
		b.DeniedFlags = append([]string(nil), DefaultDeniedBatchFlags...)
	}
	if b.PollInterval.Duration == 0 {
		b.PollInterval.Duration = DefaultPollInterval
	}
	if b.UnknownStateLimit.Duration == 0 {
		b.UnknownStateLimit.Duration = DefaultUnknownStateLimit
	}
	if b.Allocate == "" {
		b.Allocate = AllocatePrepare
	}
	if b.IdleLimit.Duration == 0 {
		b.IdleLimit.Duration = DefaultIdleLimit
	}
}

// expandable matches the only variables path keys may use.
var varRef = regexp.MustCompile(`\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?`)

// ExpandUserPath expands $HOME/${HOME} and $USER/${USER} to the job user's;
// any other variable is an error, because a value taken from the runner's
// environment would silently differ between hosts.
func ExpandUserPath(key, p string, u UserInfo) (string, error) {
	var bad []string
	out := varRef.ReplaceAllStringFunc(p, func(m string) string {
		name := varRef.FindStringSubmatch(m)[1]
		switch name {
		case "HOME":
			return u.Home
		case "USER":
			return u.Name
		}
		bad = append(bad, "$"+name)
		return m
	})
	if len(bad) > 0 {
		return "", fmt.Errorf("%s: only $HOME and $USER may be used, not %s", key, strings.Join(bad, ", "))
	}
	if strings.Contains(out, "$") {
		return "", fmt.Errorf("%s: stray '$' in %q", key, p)
	}
	return out, nil
}

func (c *Config) expand(u UserInfo) error {
	var errs []error
	exp := func(key string, p *string) {
		if *p == "" {
			return
		}
		v, err := ExpandUserPath(key, *p, u)
		if err != nil {
			errs = append(errs, err)
			return
		}
		*p = v
	}
	g := &c.General
	exp("general.data_dir", &g.DataDir)
	tables := map[string]*Mechanism{"general.charliecloud": &g.Charliecloud, "general.apptainer": &g.Apptainer, "general.podman": &g.Podman}
	for n, t := range c.Runtimes {
		if t != nil {
			tables["runtimes."+n] = &t.Mechanism
		}
	}
	for name, m := range tables {
		exp(name+".image_storage_dir", &m.ImageStorageDir)
		exp(name+".cache_dir", &m.CacheDir)
		exp(name+".tmp_dir", &m.TmpDir)
		for i := range m.VolumePrefixes {
			exp(fmt.Sprintf("%s.volume_prefixes[%d]", name, i), &m.VolumePrefixes[i])
		}
	}
	return oneLine(errs)
}

// oneLine joins validation errors (errors.Join) into a single line, so the
// job log gets one line that names every problem.
func oneLine(errs []error) error {
	if err := errors.Join(errs...); err != nil {
		return oneLineError{err}
	}
	return nil
}

type oneLineError struct{ joined error }

func (e oneLineError) Error() string { return strings.ReplaceAll(e.joined.Error(), "\n", "; ") }
func (e oneLineError) Unwrap() error { return e.joined }

var envName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
var envGlob = regexp.MustCompile(`^[A-Za-z_*?][A-Za-z0-9_*?]*$`)

// Validate checks every value and reports all problems at once.
func (c *Config) Validate() error {
	var errs []error
	add := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	g := &c.General

	switch {
	case g.DataDir == "":
		add("general.data_dir is required (e.g. data_dir = \"$HOME/.ci-exec\")")
	case !filepath.IsAbs(g.DataDir):
		add("general.data_dir must be an absolute path, got %q", g.DataDir)
	case filepath.Clean(g.DataDir) == "/":
		add("general.data_dir must not be /")
	}
	switch g.Executor {
	case ExecutorShell, ExecutorSlurm:
	default:
		add("general.executor must be %q or %q, got %q", ExecutorShell, ExecutorSlurm, g.Executor)
	}
	switch g.RunMechanism {
	case MechanismNone, MechanismCharliecloud, MechanismApptainer, MechanismPodman:
	default:
		if g.TemplateName() == "" {
			add("general.run_mechanism must be \"\", %q, %q, %q or \"template:NAME\" (a [runtimes.NAME] table), got %q", MechanismCharliecloud, MechanismApptainer, MechanismPodman, g.RunMechanism)
		}
	}
	c.validateTemplates(add)
	if g.ForceMechanism && g.RunMechanism == MechanismNone {
		add("general.force_mechanism needs general.run_mechanism")
	}
	if g.ShellPath != "" && !filepath.IsAbs(g.ShellPath) {
		add("general.shell_path must be an absolute path, got %q", g.ShellPath)
	}
	if g.KillTimeout.Duration < 0 {
		add("general.kill_timeout must be positive, got %s", g.KillTimeout.Duration)
	}
	for _, p := range g.PassEnv {
		if !envGlob.MatchString(p) {
			add("general.pass_env: %q is not a variable name or glob", p)
		}
	}
	for _, kv := range g.EnvVars {
		k, _, ok := strings.Cut(kv, "=")
		if !ok || !envName.MatchString(k) {
			add("general.env_vars: %q is not KEY=VALUE", kv)
		}
	}
	for _, mc := range []struct {
		name string
		m    *Mechanism
	}{{"charliecloud", &g.Charliecloud}, {"apptainer", &g.Apptainer}, {"podman", &g.Podman}} {
		mc.m.validate("general."+mc.name, add)
		if mc.name != MechanismPodman {
			for _, k := range []struct {
				key string
				v   []string
			}{{"runner_entry_point", mc.m.RunnerEntryPoint}, {"user_entry_point", mc.m.UserEntryPoint}} {
				if len(k.v) > 0 {
					add("general.%s.%s is a Podman setting; remove it (it belongs in [general.podman])", mc.name, k.key)
				}
			}
		}
	}
	c.validateAuth(add)
	c.validateSite(add)
	// force_mechanism without default_image is valid, as in Jacamar: jobs
	// that name no image fail in prepare (mechanism.Prepare), and none runs
	// on the host.

	b := &c.Batch
	if b.SchedulerBin != "" && !filepath.IsAbs(b.SchedulerBin) {
		add("batch.scheduler_bin must be an absolute path, got %q", b.SchedulerBin)
	}
	for _, v := range b.ArgumentsVariable {
		if !envName.MatchString(v) {
			add("batch.arguments_variable: %q is not a variable name", v)
		}
	}
	for _, f := range append(append([]string(nil), b.AllowedFlags...), b.DeniedFlags...) {
		if !strings.HasPrefix(f, "-") {
			add("batch flag lists: %q is not a flag (flags start with -)", f)
		}
	}
	if b.PendingLimit.Duration < 0 || b.PollInterval.Duration < 0 || b.UnknownStateLimit.Duration < 0 || b.IdleLimit.Duration < 0 {
		add("batch durations must be positive")
	}
	if b.Allocate != AllocatePrepare && b.Allocate != AllocateStage {
		add("batch.allocate must be %q or %q, got %q", AllocatePrepare, AllocateStage, b.Allocate)
	}
	if b.IdleLimit.Duration > 0 && b.IdleLimit.Duration < time.Second {
		add("batch.idle_limit must be at least 1s (it is checked by a shell loop on the compute node), got %s", b.IdleLimit.Duration)
	}
	return oneLine(errs)
}

func (m *Mechanism) validate(prefix string, add func(string, ...any)) {
	absOrEmpty := func(key, v string) {
		if v != "" && !filepath.IsAbs(v) {
			add("%s.%s must be an absolute path, got %q", prefix, key, v)
		}
	}
	absOrEmpty("application_path", m.ApplicationPath)
	absOrEmpty("prep_script", m.PrepScript)
	switch {
	case m.PrepScriptSHA256 == "":
	case m.PrepScript == "":
		add("%s.prep_script_sha256 is set but prep_script is not: set prep_script or remove the pin", prefix)
	case !sha256Hex.MatchString(m.PrepScriptSHA256):
		add("%s.prep_script_sha256 must be the script's 64 hex digit SHA-256 (sha256sum %s), got %q", prefix, m.PrepScript, m.PrepScriptSHA256)
	}
	absOrEmpty("image_storage_dir", m.ImageStorageDir)
	absOrEmpty("cache_dir", m.CacheDir)
	absOrEmpty("tmp_dir", m.TmpDir)
	for _, p := range []struct{ key, v string }{{"pull_policy", m.PullPolicy}, {"runner_pull_policy", m.RunnerPullPolicy}} {
		switch p.v {
		case PullAlways, PullIfNotPresent, PullNever:
		default:
			add("%s.%s must be %q, %q or %q, got %q", prefix, p.key, PullAlways, PullIfNotPresent, PullNever, p.v)
		}
	}
	for i, re := range m.ImageAllowlist {
		if err := checkAllowlistEntry(re); err != nil {
			add("%s.image_allowlist[%d]: %v", prefix, i, err)
		}
	}
	if m.UserVolumeVariable != "" && !envName.MatchString(m.UserVolumeVariable) {
		add("%s.user_volume_variable: %q is not a variable name", prefix, m.UserVolumeVariable)
	}
	for i, p := range m.VolumePrefixes {
		if !filepath.IsAbs(p) || filepath.Clean(p) == "/" {
			add("%s.volume_prefixes[%d] must be an absolute directory other than /, got %q", prefix, i, p)
		}
	}
	for _, f := range m.AllowedUserArgs {
		if !strings.HasPrefix(f, "-") {
			add("%s.allowed_user_args: %q is not a flag (flags start with -)", prefix, f)
		}
	}
	for _, p := range m.PassEnv {
		if !envGlob.MatchString(p) {
			add("%s.pass_env: %q is not a variable name or glob", prefix, p)
		}
	}
	if m.MaxConcurrentBuilds < 0 {
		add("%s.max_concurrent_builds must be positive, got %d", prefix, m.MaxConcurrentBuilds)
	}
	if m.CacheMaxAge.Duration < 0 {
		add("%s.cache_max_age must be positive, got %s", prefix, m.CacheMaxAge.Duration)
	}
	for _, r := range m.InsecureRegistries {
		if r == "" || strings.ContainsAny(r, "/ \t") {
			add("%s.insecure_registries: %q is not host[:port]", prefix, r)
		}
	}
	for _, k := range []struct {
		key string
		v   []string
	}{{"runner_entry_point", m.RunnerEntryPoint}, {"user_entry_point", m.UserEntryPoint}} {
		if err := checkEntryPoint(k.v); err != nil {
			add("%s.%s: %v", prefix, k.key, err)
		}
	}
}

// checkEntryPoint accepts an empty entry point, or an absolute program and
// its arguments. Jacamar's `["/bin/bash", "-l", "-c"]` form would take
// the stage's first word as a script text: ci-exec gives the entry point
// the stage command as arguments, so it must run them ("exec \"$@\"").
func checkEntryPoint(words []string) error {
	if len(words) == 0 {
		return nil
	}
	if !filepath.IsAbs(words[0]) {
		return fmt.Errorf("the program must be an absolute path in the image, got %q", words[0])
	}
	for _, w := range words {
		if strings.ContainsRune(w, 0) {
			return fmt.Errorf("%q contains a NUL byte", w)
		}
	}
	if last := words[len(words)-1]; last == "-c" || last == "--command" {
		return fmt.Errorf("an entry point ending in %q (Jacamar's [\"/bin/bash\", \"-l\", \"-c\"]) would run the stage's first word as a script; give a program that runs its arguments, e.g. [\"/bin/bash\", \"-l\"] with a script that ends in exec \"$@\", or leave it empty", last)
	}
	return nil
}

// MatchAny reports whether name matches one of the shell globs (pass_env
// entries such as "LC_*").
func MatchAny(globs []string, name string) bool {
	for _, g := range globs {
		if ok, _ := path.Match(g, name); ok {
			return true
		}
	}
	return false
}

// Mechanism returns the table of the configured run mechanism, or nil when
// jobs run on the host.
func (c *Config) Mechanism() *Mechanism {
	switch c.General.RunMechanism {
	case MechanismCharliecloud:
		return &c.General.Charliecloud
	case MechanismApptainer:
		return &c.General.Apptainer
	case MechanismPodman:
		return &c.General.Podman
	}
	if t := c.Template(); t != nil {
		return &t.Mechanism
	}
	return nil
}

// MechanismTable is the key prefix of the run mechanism's table in error
// messages: "general.podman", or "runtimes.NAME" for a template.
func (c *Config) MechanismTable() string {
	if n := c.General.TemplateName(); n != "" {
		return "runtimes." + n
	}
	return "general." + c.General.RunMechanism
}

// Template returns the template run_mechanism names, or nil.
func (c *Config) Template() *Template {
	if n := c.General.TemplateName(); n != "" {
		return c.Runtimes[n]
	}
	return nil
}

// IsBatch reports whether user scripts go to a scheduler.
func (c *Config) IsBatch() bool { return c.General.Executor == ExecutorSlurm }
