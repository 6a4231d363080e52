package config

import (
	"fmt"
	"net"
	"net/url"
	"path"
	"path/filepath"
	"regexp"
	"strings"
	"time"
)

// Downscope values for `[auth] downscope`.
const (
	// DownscopeNone runs every stage as the account the runner starts
	// ci-exec as (one runner per user; today's behaviour).
	DownscopeNone = "none"
	// DownscopeSetuid verifies the job's ID token and runs the job as the
	// local account of the GitLab user (one runner for a whole centre).
	DownscopeSetuid = "setuid"
)

// Auth defaults.
const (
	DefaultJWTEnvVariable = "SITE_ID_TOKEN"
	DefaultJWKSTTL        = time.Hour
	DefaultMinUID         = 1000
	// DefaultStateDir is where a downscoping runner keeps what steers a
	// job's later stages (the verified identity, prepare's result): owned
	// by the runner's account and outside every user's reach.
	DefaultStateDir = "/var/lib/ci-exec/state"
	// AuditSyslog sends the audit trail to the local syslog (the default).
	AuditSyslog = "syslog"
)

// Auth is the `[auth]` table: how a job's identity is verified and which
// local account it may run as. Key names are Jacamar CI's where it has
// them (downscope, user_allowlist, user_blocklist, groups_allowlist,
// groups_blocklist, [auth.runas]), so a Jacamar site's table carries over.
type Auth struct {
	// Downscope is "none" (default) or "setuid".
	Downscope string `toml:"downscope"`
	// JWTAudience is the `aud` the ID token must carry; default: the
	// normalised general.gitlab_server.
	JWTAudience string `toml:"jwt_audience"`
	// JWKSFile holds GitLab's signing keys (a JWKS document) for offline
	// sites and tests; empty: fetched from <gitlab_server>/oauth/discovery/keys.
	JWKSFile string `toml:"jwks_file"`
	// JWKSTTL is how long fetched keys are reused (default 1h).
	JWKSTTL Duration `toml:"jwks_ttl"`
	// UserAllowlist / UserBlocklist are local account names.
	UserAllowlist []string `toml:"user_allowlist"`
	UserBlocklist []string `toml:"user_blocklist"`
	// GroupsAllowlist / GroupsBlocklist are local group names of the
	// resolved account (primary and supplementary).
	GroupsAllowlist []string `toml:"groups_allowlist"`
	GroupsBlocklist []string `toml:"groups_blocklist"`
	// NamespaceAllowlist / NamespaceBlocklist are globs (path.Match, as
	// pass_env) matched against the token's namespace_path and project_path.
	NamespaceAllowlist []string `toml:"namespace_allowlist"`
	NamespaceBlocklist []string `toml:"namespace_blocklist"`
	// MinUID refuses accounts with a lower uid (default 1000): system and
	// service accounts below it must never run jobs.
	MinUID int `toml:"min_uid"`
	// AllowRoot admits uid 0 (refused by default, whatever min_uid says).
	AllowRoot bool `toml:"allow_root"`
	// StateDir holds, per job, the verified identity and prepare's result
	// while the job runs (default DefaultStateDir). It must belong to the
	// runner's account and no user may write to it or to any dir above it.
	StateDir string `toml:"state_dir"`
	// AuditLog is "syslog" (default: one record per stage, facility
	// authpriv) or the absolute path of a JSON-lines file.
	AuditLog string `toml:"audit_log"`
	// UserExecutable is the ci-exec the job user's stages run (default:
	// the running one). A deployment with file capabilities needs it: the
	// privileged copy must not be executable by users, the user's copy must.
	UserExecutable string `toml:"user_executable"`
	// RunAs is `[auth.runas]`.
	RunAs RunAs `toml:"runas"`

	// dataDirPerUser records whether general.data_dir named $USER or $HOME
	// before expansion: a downscoping runner must give every user their own.
	dataDirPerUser bool
}

// RunAs is `[auth.runas]`: an admin script, pinned by its sha256, that
// approves (and may rename) the account a job runs as; it alone can let a
// job run as a service account named in UserVariable.
type RunAs struct {
	ValidationScript string `toml:"validation_script"`
	SHA256           string `toml:"sha256"`
	// UserVariable is the job variable in which a job asks for another
	// account; honoured only when ValidationScript approves.
	UserVariable string `toml:"user_variable"`
}

// Downscoping reports whether jobs run as the GitLab user's local account.
func (a *Auth) Downscoping() bool { return a.Downscope == DownscopeSetuid }

// setuidWired says the stages run jobs as the verified user (package
// downscope). A build without it refuses `downscope = "setuid"` after
// checking it in full, so that no admin believes jobs run as their GitLab
// users when they do not.
var setuidWired = true

var sha256Hex = regexp.MustCompile(`^[0-9a-fA-F]{64}$`)

// authDefaults fills the defaults; minUIDSet says whether the file gave
// auth.min_uid (0 is a value an admin may mean).
func (c *Config) authDefaults(minUIDSet bool) {
	g, a := &c.General, &c.Auth
	g.GitlabServer = NormaliseServer(g.GitlabServer)
	if g.JWTEnvVariable == "" {
		g.JWTEnvVariable = DefaultJWTEnvVariable
	}
	if a.Downscope == "" {
		a.Downscope = DownscopeNone
	}
	if a.JWTAudience == "" {
		a.JWTAudience = g.GitlabServer
	}
	if a.JWKSTTL.Duration == 0 {
		a.JWKSTTL.Duration = DefaultJWKSTTL
	}
	if !minUIDSet {
		a.MinUID = DefaultMinUID
	}
	if a.StateDir == "" {
		a.StateDir = DefaultStateDir
	}
	if a.AuditLog == "" {
		a.AuditLog = AuditSyslog
	}
	a.dataDirPerUser = perUserPath(g.DataDir)
	a.RunAs.SHA256 = strings.ToLower(a.RunAs.SHA256)
}

// perUserPath reports whether a path key names the job user ($USER or
// $HOME, braced or not) before expansion.
func perUserPath(p string) bool {
	for _, m := range varRef.FindAllStringSubmatch(p, -1) {
		if m[1] == "USER" || m[1] == "HOME" {
			return true
		}
	}
	return false
}

// NormaliseServer drops trailing slashes, so that "https://gitlab.example/"
// and the issuer GitLab writes ("https://gitlab.example") compare equal.
func NormaliseServer(s string) string { return strings.TrimRight(strings.TrimSpace(s), "/") }

// CheckServerURL checks a trusted GitLab URL: absolute https, or http only
// to the loopback host (a test or a local reverse proxy), no credentials,
// query or fragment.
func CheckServerURL(s string) error {
	u, err := url.Parse(s)
	if err != nil || u.Host == "" || u.Opaque != "" {
		return fmt.Errorf("%q is not an absolute URL (write e.g. \"https://gitlab.example.com\")", s)
	}
	if u.User != nil || u.RawQuery != "" || u.Fragment != "" || strings.HasSuffix(s, "?") || strings.HasSuffix(s, "#") {
		return fmt.Errorf("%q must be the plain server URL, without user, query or fragment", s)
	}
	switch u.Scheme {
	case "https":
		return nil
	case "http":
		h := u.Hostname()
		if ip := net.ParseIP(h); h == "localhost" || (ip != nil && ip.IsLoopback()) {
			return nil
		}
		return fmt.Errorf("%q must use https (http is accepted only for localhost/127.0.0.1)", s)
	}
	return fmt.Errorf("%q must be an https URL", s)
}

func (c *Config) validateAuth(add func(string, ...any)) {
	g, a := &c.General, &c.Auth
	if g.GitlabServer != "" {
		if err := CheckServerURL(g.GitlabServer); err != nil {
			add("general.gitlab_server: %v", err)
		}
	}
	if !envName.MatchString(g.JWTEnvVariable) {
		add("general.jwt_env_variable: %q is not a variable name", g.JWTEnvVariable)
	}
	switch a.Downscope {
	case DownscopeNone:
	case DownscopeSetuid:
		if g.GitlabServer == "" {
			add("auth.downscope = \"setuid\" needs general.gitlab_server, the GitLab whose ID tokens identify the job's user (e.g. gitlab_server = \"https://gitlab.example.com\")")
		}
		if g.DataDir != "" && !a.dataDirPerUser {
			add("general.data_dir %q is shared by every user; with auth.downscope = \"setuid\" each user needs their own: put $USER or $HOME in it (e.g. data_dir = \"/srv/ci/$USER\")", g.DataDir)
		}
		if !setuidWired {
			add("auth.downscope = \"setuid\" is not available in this build of ci-exec yet (jobs would still run as the runner's account); use downscope = \"none\" and run the runner as the job's user")
		}
	case "sudo":
		add("auth.downscope = \"sudo\" is not supported by ci-exec; use \"setuid\" (root or CAP_SETUID/CAP_SETGID) or \"none\"")
	default:
		add("auth.downscope must be %q or %q, got %q", DownscopeSetuid, DownscopeNone, a.Downscope)
	}
	if a.JWTAudience != "" && strings.TrimSpace(a.JWTAudience) != a.JWTAudience {
		add("auth.jwt_audience: %q has surrounding spaces", a.JWTAudience)
	}
	if a.JWKSFile != "" && !filepath.IsAbs(a.JWKSFile) {
		add("auth.jwks_file must be an absolute path, got %q", a.JWKSFile)
	}
	if !filepath.IsAbs(a.StateDir) || filepath.Clean(a.StateDir) == "/" {
		add("auth.state_dir must be an absolute path other than /, got %q", a.StateDir)
	}
	if a.AuditLog != AuditSyslog && !filepath.IsAbs(a.AuditLog) {
		add("auth.audit_log must be %q or the absolute path of a JSON-lines file, got %q", AuditSyslog, a.AuditLog)
	}
	if a.UserExecutable != "" && !filepath.IsAbs(a.UserExecutable) {
		add("auth.user_executable must be an absolute path, got %q", a.UserExecutable)
	}
	if a.JWKSTTL.Duration < 0 {
		add("auth.jwks_ttl must be positive, got %s", a.JWKSTTL.Duration)
	}
	for _, l := range []struct {
		key   string
		names []string
	}{{"user_allowlist", a.UserAllowlist}, {"user_blocklist", a.UserBlocklist},
		{"groups_allowlist", a.GroupsAllowlist}, {"groups_blocklist", a.GroupsBlocklist}} {
		for i, n := range l.names {
			if n == "" || strings.ContainsAny(n, " \t\n:/") {
				add("auth.%s[%d]: %q is not an account or group name", l.key, i, n)
			}
		}
	}
	for _, l := range []struct {
		key   string
		globs []string
	}{{"namespace_allowlist", a.NamespaceAllowlist}, {"namespace_blocklist", a.NamespaceBlocklist}} {
		for i, p := range l.globs {
			if _, err := path.Match(p, ""); err != nil || p == "" || strings.HasPrefix(p, "/") {
				add("auth.%s[%d]: %q is not a GitLab path glob (write e.g. \"hpc-group/*\")", l.key, i, p)
			}
		}
	}
	if a.MinUID < 0 {
		add("auth.min_uid must not be negative, got %d", a.MinUID)
	}
	r := &a.RunAs
	if r.ValidationScript != "" {
		if !filepath.IsAbs(r.ValidationScript) {
			add("auth.runas.validation_script must be an absolute path, got %q", r.ValidationScript)
		}
		if !sha256Hex.MatchString(r.SHA256) {
			add("auth.runas.sha256 must be the script's 64 hex digit SHA-256 (sha256sum %s), got %q", r.ValidationScript, r.SHA256)
		}
	} else if r.SHA256 != "" {
		add("auth.runas.sha256 is set without auth.runas.validation_script")
	}
	if r.UserVariable != "" {
		if !envName.MatchString(r.UserVariable) {
			add("auth.runas.user_variable: %q is not a variable name", r.UserVariable)
		}
		if r.ValidationScript == "" {
			add("auth.runas.user_variable needs auth.runas.validation_script: only the script may approve another account")
		}
	}
}
