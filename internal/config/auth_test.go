package config

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// unwireSetuid makes the build one without downscoping.
func unwireSetuid(t *testing.T) {
	old := setuidWired
	setuidWired = false
	t.Cleanup(func() { setuidWired = old })
}

const authHead = "[general]\ndata_dir = \"/d/$USER\"\n"

func TestAuthDefaults(t *testing.T) {
	cfg, err := Parse(authHead, bob)
	require.NoError(t, err)
	a := cfg.Auth
	assert.Equal(t, DownscopeNone, a.Downscope)
	assert.False(t, a.Downscoping())
	assert.Equal(t, DefaultJWTEnvVariable, cfg.General.JWTEnvVariable)
	assert.Equal(t, "", a.JWTAudience, "no gitlab_server, no audience")
	assert.Equal(t, time.Hour, a.JWKSTTL.Duration)
	assert.Equal(t, 1000, a.MinUID)
	assert.False(t, a.AllowRoot)

	cfg, err = Parse(authHead+"gitlab_server = \"https://gitlab.example.com//\"\n[auth]\nmin_uid = 0\n", bob)
	require.NoError(t, err)
	assert.Equal(t, "https://gitlab.example.com", cfg.General.GitlabServer, "trailing slashes normalised")
	assert.Equal(t, "https://gitlab.example.com", cfg.Auth.JWTAudience, "audience defaults to gitlab_server")
	assert.Equal(t, 0, cfg.Auth.MinUID, "an explicit 0 is kept")
}

// TestJacamarAuthTableLoads: a Jacamar site's [auth] table, with the keys
// ci-exec shares, loads with their meaning.
func TestJacamarAuthTableLoads(t *testing.T) {
	const sum = "0123456789abcdef0123456789ABCDEF0123456789abcdef0123456789abcdef"
	doc := authHead + `gitlab_server = "https://gitlab.example.com/"
jwt_env_variable = "CI_SITE_TOKEN"

[auth]
downscope = "setuid"
jwt_audience = "https://ci.example.com"
jwks_file = "/etc/ci-exec/jwks.json"
jwks_ttl = "10m"
user_allowlist = ["alice", "bob"]
user_blocklist = ["mallory"]
groups_allowlist = ["hpc"]
groups_blocklist = ["suspended"]
namespace_allowlist = ["hpc/*", "alice"]
namespace_blocklist = ["hpc/secret"]
min_uid = 5000
allow_root = true

[auth.runas]
validation_script = "/etc/ci-exec/runas.sh"
sha256 = "` + sum + `"
user_variable = "RUNAS_USER"
`
	cfg, err := Parse(doc, bob)
	require.NoError(t, err)
	g, a := cfg.General, cfg.Auth
	assert.Equal(t, "https://gitlab.example.com", g.GitlabServer)
	assert.Equal(t, "CI_SITE_TOKEN", g.JWTEnvVariable)
	assert.True(t, a.Downscoping())
	assert.Equal(t, "https://ci.example.com", a.JWTAudience)
	assert.Equal(t, "/etc/ci-exec/jwks.json", a.JWKSFile)
	assert.Equal(t, 10*time.Minute, a.JWKSTTL.Duration)
	assert.Equal(t, []string{"alice", "bob"}, a.UserAllowlist)
	assert.Equal(t, []string{"mallory"}, a.UserBlocklist)
	assert.Equal(t, []string{"hpc"}, a.GroupsAllowlist)
	assert.Equal(t, []string{"suspended"}, a.GroupsBlocklist)
	assert.Equal(t, []string{"hpc/*", "alice"}, a.NamespaceAllowlist)
	assert.Equal(t, []string{"hpc/secret"}, a.NamespaceBlocklist)
	assert.Equal(t, 5000, a.MinUID)
	assert.True(t, a.AllowRoot)
	assert.Equal(t, "/etc/ci-exec/runas.sh", a.RunAs.ValidationScript)
	assert.Equal(t, strings.ToLower(sum), a.RunAs.SHA256)
	assert.Equal(t, "RUNAS_USER", a.RunAs.UserVariable)
}

// TestSetuidNeedsPerUserDataDir: one data_dir for every user would let one
// user's job reach another's tree.
func TestSetuidNeedsPerUserDataDir(t *testing.T) {
	const tail = "gitlab_server = \"https://g.example\"\n[auth]\ndownscope = \"setuid\"\n"
	_, err := Parse("[general]\ndata_dir = \"/srv/ci\"\n"+tail, bob)
	require.Error(t, err)
	assert.Contains(t, err.Error(), `general.data_dir "/srv/ci" is shared by every user; with auth.downscope = "setuid" each user needs their own: put $USER or $HOME in it`)
	for _, dd := range []string{"/srv/ci/$USER", "/srv/${USER}/ci", "$HOME/.ci-exec", "${HOME}/ci"} {
		_, err := Parse("[general]\ndata_dir = \""+dd+"\"\n"+tail, bob)
		assert.NoError(t, err, dd)
	}
}

func TestSetuidRefusedUntilWired(t *testing.T) {
	unwireSetuid(t)
	_, err := Parse(authHead+"gitlab_server = \"https://gitlab.example.com\"\n[auth]\ndownscope = \"setuid\"\n", bob)
	require.Error(t, err)
	assert.Contains(t, err.Error(), `auth.downscope = "setuid" is not available in this build`)
}

func TestAuthErrors(t *testing.T) {
	const sum = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	cases := map[string]struct{ doc, want string }{
		"setuid without server": {"[auth]\ndownscope = \"setuid\"\n", `auth.downscope = "setuid" needs general.gitlab_server`},
		"bad downscope":         {"[auth]\ndownscope = \"su\"\n", `auth.downscope must be "setuid" or "none", got "su"`},
		"http server":           {"gitlab_server = \"http://gitlab.example.com\"\n", `general.gitlab_server: "http://gitlab.example.com" must use https (http is accepted only for localhost/127.0.0.1)`},
		"relative server":       {"gitlab_server = \"gitlab.example.com\"\n", `general.gitlab_server: "gitlab.example.com" is not an absolute URL`},
		"ftp server":            {"gitlab_server = \"ftp://gitlab.example.com\"\n", `must be an https URL`},
		"server with query":     {"gitlab_server = \"https://gitlab.example.com/?x=1\"\n", `without user, query or fragment`},
		"server with user":      {"gitlab_server = \"https://u:p@gitlab.example.com\"\n", `without user, query or fragment`},
		"bad jwt variable":      {"jwt_env_variable = \"SITE-TOKEN\"\n", `general.jwt_env_variable: "SITE-TOKEN" is not a variable name`},
		"relative jwks_file":    {"[auth]\njwks_file = \"jwks.json\"\n", `auth.jwks_file must be an absolute path, got "jwks.json"`},
		"negative ttl":          {"[auth]\njwks_ttl = \"-1m\"\n", `auth.jwks_ttl must be positive`},
		"bad ttl":               {"[auth]\njwks_ttl = \"soon\"\n", `not a duration`},
		"negative min_uid":      {"[auth]\nmin_uid = -1\n", `auth.min_uid must not be negative, got -1`},
		"bad user entry":        {"[auth]\nuser_blocklist = [\"a b\"]\n", `auth.user_blocklist[0]: "a b" is not an account or group name`},
		"bad group entry":       {"[auth]\ngroups_allowlist = [\"\"]\n", `auth.groups_allowlist[0]: "" is not an account or group name`},
		"bad namespace glob":    {"[auth]\nnamespace_allowlist = [\"hpc/[\"]\n", `auth.namespace_allowlist[0]: "hpc/[" is not a GitLab path glob`},
		"absolute namespace":    {"[auth]\nnamespace_blocklist = [\"/hpc\"]\n", `auth.namespace_blocklist[0]: "/hpc" is not a GitLab path glob`},
		"relative script":       {"[auth.runas]\nvalidation_script = \"runas.sh\"\nsha256 = \"" + sum + "\"\n", `auth.runas.validation_script must be an absolute path, got "runas.sh"`},
		"script without sha":    {"[auth.runas]\nvalidation_script = \"/r.sh\"\n", `auth.runas.sha256 must be the script's 64 hex digit SHA-256 (sha256sum /r.sh), got ""`},
		"short sha":             {"[auth.runas]\nvalidation_script = \"/r.sh\"\nsha256 = \"abc\"\n", `auth.runas.sha256 must be the script's 64 hex digit SHA-256`},
		"non-hex sha":           {"[auth.runas]\nvalidation_script = \"/r.sh\"\nsha256 = \"" + strings.Repeat("g", 64) + "\"\n", `auth.runas.sha256 must be`},
		"sha without script":    {"[auth.runas]\nsha256 = \"" + sum + "\"\n", `auth.runas.sha256 is set without auth.runas.validation_script`},
		"user var no script":    {"[auth.runas]\nuser_variable = \"RUNAS\"\n", `auth.runas.user_variable needs auth.runas.validation_script`},
		"bad user var":          {"[auth.runas]\nvalidation_script = \"/r.sh\"\nsha256 = \"" + sum + "\"\nuser_variable = \"RUN AS\"\n", `auth.runas.user_variable: "RUN AS" is not a variable name`},
		"relative state_dir":    {"[auth]\nstate_dir = \"state\"\n", `auth.state_dir must be an absolute path other than /, got "state"`},
		"root state_dir":        {"[auth]\nstate_dir = \"/\"\n", `auth.state_dir must be an absolute path other than /`},
		"bad audit_log":         {"[auth]\naudit_log = \"journal\"\n", `auth.audit_log must be "syslog" or the absolute path of a JSON-lines file, got "journal"`},
		"unknown runas key":     {"[auth.runas]\nscript = \"/r.sh\"\n", `unknown key "auth.runas.script" (check the spelling`},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			doc := authHead
			if !strings.HasPrefix(c.doc, "[") {
				doc += c.doc
			} else {
				doc += "\n" + c.doc
			}
			_, err := Parse(doc, bob)
			require.Error(t, err)
			assert.Contains(t, err.Error(), c.want)
			assert.NotContains(t, err.Error(), "\n")
		})
	}
}

func TestCheckServerURL(t *testing.T) {
	for _, ok := range []string{"https://gitlab.example.com", "https://gitlab.example.com:8443/gitlab", "http://127.0.0.1:8080", "http://localhost", "http://[::1]:3000"} {
		assert.NoError(t, CheckServerURL(ok), ok)
	}
	for _, bad := range []string{"", "https://", "http://127.0.0.2.example.com", "http://gitlab", "file:///etc/x", "https://x#f"} {
		assert.Error(t, CheckServerURL(bad), bad)
	}
}
