package authz_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/authz"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/idtoken"
)

// fakeAccounts is a passwd/group database.
type fakeAccounts map[string]authz.Account

func (f fakeAccounts) Lookup(name string) (*authz.Account, error) {
	a, ok := f[name]
	if !ok {
		return nil, fmt.Errorf("lookup: %w", user.UnknownUserError(name))
	}
	return &a, nil
}

var accounts = fakeAccounts{
	"alice":   {Name: "alice", UID: 1001, GID: 1001, Home: "/home/alice", Group: []string{"alice", "hpc"}},
	"bob":     {Name: "bob", UID: 1002, GID: 1002, Home: "/home/bob", Group: []string{"bob", "suspended"}},
	"root":    {Name: "root", UID: 0, GID: 0, Home: "/root", Group: []string{"root"}},
	"daemon":  {Name: "daemon", UID: 2, GID: 2, Group: []string{"daemon"}},
	"svc-sim": {Name: "svc-sim", UID: 5000, GID: 5000, Group: []string{"svc"}},
}

func claims(login string) *idtoken.Claims {
	return &idtoken.Claims{UserLogin: login, UserID: "42", NamespacePath: "hpc", ProjectPath: "hpc/app", JobID: "7", PipelineID: "3"}
}

func decider(a config.Auth) *authz.Decider {
	if a.MinUID == 0 {
		a.MinUID = config.DefaultMinUID
	}
	return &authz.Decider{Auth: a, Accounts: accounts, Host: "node1"}
}

func denied(t *testing.T, err error, want ...string) {
	t.Helper()
	require.Error(t, err)
	assert.Equal(t, failure.User, failure.ClassOf(err), "a denial is a build failure: %v", err)
	assert.NotContains(t, err.Error(), "\n")
	for _, w := range want {
		assert.Contains(t, err.Error(), w)
	}
}

func TestAccountFromUserLogin(t *testing.T) {
	d, err := decider(config.Auth{}).Decide(context.Background(), claims("alice"), "")
	require.NoError(t, err)
	assert.Equal(t, "alice", d.GitLabUser)
	assert.Equal(t, "alice", d.Account.Name)
	assert.Equal(t, 1001, d.Account.UID)
	assert.Equal(t, "user_login", d.Via)
}

// TestForgedGitLabUserLoginIgnored: the job can set GITLAB_USER_LOGIN (and
// the runner passes it on as CUSTOM_ENV_GITLAB_USER_LOGIN) and can set the
// RunAs variable; without an approving script neither changes the account.
func TestForgedGitLabUserLoginIgnored(t *testing.T) {
	t.Setenv("GITLAB_USER_LOGIN", "root")
	t.Setenv("CUSTOM_ENV_GITLAB_USER_LOGIN", "root")
	t.Setenv("CUSTOM_ENV_GITLAB_USER_ID", "1")
	t.Setenv("USER", "root")
	d, err := decider(config.Auth{AllowRoot: true, MinUID: 1}).Decide(context.Background(), claims("alice"), "root")
	require.NoError(t, err)
	assert.Equal(t, "alice", d.Account.Name, "identity only from the verified claims")
	assert.Equal(t, "user_login", d.Via)
}

func TestUnknownAccountNamesUserAndHost(t *testing.T) {
	_, err := decider(config.Auth{}).Decide(context.Background(), claims("carol"), "")
	denied(t, err, `GitLab user "carol" has no local account "carol" on host node1`)
	_, err = decider(config.Auth{}).Decide(context.Background(), claims(""), "")
	denied(t, err, "names no GitLab user")
}

func TestLookupFailureIsSystem(t *testing.T) {
	d := decider(config.Auth{})
	d.Accounts = brokenAccounts{}
	_, err := d.Decide(context.Background(), claims("alice"), "")
	require.Error(t, err)
	assert.Equal(t, failure.System, failure.ClassOf(err))
	assert.Contains(t, err.Error(), "LDAP down")
}

type brokenAccounts struct{}

func (brokenAccounts) Lookup(string) (*authz.Account, error) { return nil, errors.New("LDAP down") }

func TestRules(t *testing.T) {
	cases := map[string]struct {
		auth  config.Auth
		login string
		want  string // "" = allowed
	}{
		"user blocklist":             {config.Auth{UserBlocklist: []string{"alice"}}, "alice", `GitLab user "alice" (local account "alice") is denied: the account is in auth.user_blocklist`},
		"group blocklist":            {config.Auth{GroupsBlocklist: []string{"suspended"}}, "bob", `its group "suspended" is in auth.groups_blocklist`},
		"blocklist beats allowlist":  {config.Auth{UserAllowlist: []string{"bob"}, GroupsBlocklist: []string{"suspended"}}, "bob", "auth.groups_blocklist"},
		"user allowlist admits":      {config.Auth{UserAllowlist: []string{"alice"}}, "alice", ""},
		"user allowlist refuses":     {config.Auth{UserAllowlist: []string{"alice"}}, "bob", `"bob" (local account "bob") is denied: the account is neither in auth.user_allowlist nor in a group of auth.groups_allowlist`},
		"group allowlist admits":     {config.Auth{GroupsAllowlist: []string{"hpc"}}, "alice", ""},
		"group allowlist refuses":    {config.Auth{GroupsAllowlist: []string{"hpc"}}, "bob", "auth.groups_allowlist"},
		"either allowlist admits":    {config.Auth{UserAllowlist: []string{"bob"}, GroupsAllowlist: []string{"hpc"}}, "alice", ""},
		"namespace blocklist":        {config.Auth{NamespaceBlocklist: []string{"hpc/*"}}, "alice", `project "hpc/app" (namespace "hpc") matches auth.namespace_blocklist`},
		"namespace allowlist admits": {config.Auth{NamespaceAllowlist: []string{"other", "hpc"}}, "alice", ""},
		"project glob admits":        {config.Auth{NamespaceAllowlist: []string{"*/app"}}, "alice", ""},
		"namespace allowlist refuse": {config.Auth{NamespaceAllowlist: []string{"physics/*"}}, "alice", "matches no entry of auth.namespace_allowlist"},
		"root refused":               {config.Auth{MinUID: 1}, "root", `GitLab user "root" (local account "root") is denied: jobs never run as root (uid 0) unless auth.allow_root = true`},
		"root allowed":               {config.Auth{AllowRoot: true}, "root", ""},
		"system account":             {config.Auth{}, "daemon", `GitLab user "daemon" (local account "daemon") is denied: uid 2 is below auth.min_uid 1000`},
		"min_uid raised":             {config.Auth{MinUID: 1002}, "alice", "uid 1001 is below auth.min_uid 1002"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := decider(c.auth).Decide(context.Background(), claims(c.login), "")
			if c.want == "" {
				assert.NoError(t, err)
				return
			}
			denied(t, err, c.want)
		})
	}
}

func TestOSAccounts(t *testing.T) {
	me, err := user.Current()
	require.NoError(t, err)
	a, err := authz.OSAccounts{}.Lookup(me.Username)
	require.NoError(t, err)
	assert.Equal(t, me.Uid, strconv.Itoa(a.UID))
	assert.Equal(t, me.HomeDir, a.Home)
	g, err := user.LookupGroupId(me.Gid)
	require.NoError(t, err)
	assert.Contains(t, a.Group, g.Name, "the primary group is among the groups")

	_, err = authz.OSAccounts{}.Lookup("no-such-user-ci-exec")
	var unknown user.UnknownUserError
	assert.ErrorAs(t, err, &unknown)
}

// writeScript writes an admin RunAs script and returns its config.
func writeScript(t *testing.T, body string) config.RunAs {
	p := filepath.Join(t.TempDir(), "runas.sh")
	doc := "#!/bin/sh\n" + body
	require.NoError(t, os.WriteFile(p, []byte(doc), 0o755))
	sum := sha256.Sum256([]byte(doc))
	return config.RunAs{ValidationScript: p, SHA256: hex.EncodeToString(sum[:]), UserVariable: "RUNAS_USER"}
}

func runasDecider(r config.RunAs) *authz.Decider {
	d := decider(config.Auth{RunAs: r})
	d.RunAs = authz.Script{Conf: r}
	return d
}

func TestRunAsScriptApprovesServiceAccount(t *testing.T) {
	out := filepath.Join(t.TempDir(), "seen")
	t.Setenv("SECRET_OF_THE_RUNNER", "x")
	r := writeScript(t, `env | sort > `+out+`
echo "args: $*" >> `+out+`
[ "$CI_EXEC_CLAIM_USER_LOGIN" = alice ] && [ "$CI_EXEC_RUNAS_USER" = svc-sim ] || exit 1
echo svc-sim
`)
	d, err := runasDecider(r).Decide(context.Background(), claims("alice"), "svc-sim")
	require.NoError(t, err)
	assert.Equal(t, "svc-sim", d.Account.Name)
	assert.Equal(t, "runas", d.Via)
	assert.Equal(t, "alice", d.GitLabUser)
	seen, err := os.ReadFile(out)
	require.NoError(t, err)
	for _, w := range []string{"CI_EXEC_CLAIM_USER_LOGIN=alice", "CI_EXEC_CLAIM_PROJECT_PATH=hpc/app", "CI_EXEC_CLAIM_JOB_ID=7", "CI_EXEC_RUNAS_USER=svc-sim", "args: alice svc-sim"} {
		assert.Contains(t, string(seen), w)
	}
	assert.NotContains(t, string(seen), "SECRET_OF_THE_RUNNER", "a clean environment")
}

func TestRunAsScriptDefaultsAndRenames(t *testing.T) {
	// Exit 0 without output: the requested account, or the login.
	r := writeScript(t, "exit 0\n")
	d, err := runasDecider(r).Decide(context.Background(), claims("alice"), "")
	require.NoError(t, err)
	assert.Equal(t, "alice", d.Account.Name)
	assert.Equal(t, "user_login", d.Via)
	d, err = runasDecider(r).Decide(context.Background(), claims("alice"), "svc-sim")
	require.NoError(t, err)
	assert.Equal(t, "svc-sim", d.Account.Name)

	// Mapping a GitLab login onto another local name.
	r = writeScript(t, "echo checking >&2\necho\necho bob\n\n")
	d, err = runasDecider(r).Decide(context.Background(), claims("alice"), "")
	require.NoError(t, err)
	assert.Equal(t, "bob", d.Account.Name)

	// The approved account still passes the rules.
	r = writeScript(t, "echo root\n")
	_, err = runasDecider(r).Decide(context.Background(), claims("alice"), "")
	denied(t, err, `local account "root"`, "auth.allow_root")
	r = writeScript(t, "echo ghost\n")
	_, err = runasDecider(r).Decide(context.Background(), claims("alice"), "")
	denied(t, err, `the account "ghost" approved by auth.runas does not exist on host node1`)

	// Without user_variable the job's request is ignored.
	r = writeScript(t, `[ -z "$CI_EXEC_RUNAS_USER" ] || exit 3`+"\n")
	r.UserVariable = ""
	d, err = runasDecider(r).Decide(context.Background(), claims("alice"), "svc-sim")
	require.NoError(t, err)
	assert.Equal(t, "alice", d.Account.Name)
}

func TestRunAsScriptDenies(t *testing.T) {
	r := writeScript(t, "echo 'alice may not use svc-sim' >&2\nexit 2\n")
	_, err := runasDecider(r).Decide(context.Background(), claims("alice"), "svc-sim")
	denied(t, err, `GitLab user "alice" is denied running as "svc-sim" by auth.runas.validation_script: alice may not use svc-sim`)
	r = writeScript(t, "exit 5\n")
	_, err = runasDecider(r).Decide(context.Background(), claims("alice"), "")
	denied(t, err, `denied running as "alice"`, "exit code 5")
}

func TestRunAsScriptPinned(t *testing.T) {
	ran := filepath.Join(t.TempDir(), "ran")
	r := writeScript(t, "touch "+ran+"\n")
	// The admin's pin is of another content: the script must not run.
	r.SHA256 = strings.Repeat("0", 64)
	_, err := runasDecider(r).Decide(context.Background(), claims("alice"), "")
	require.Error(t, err)
	assert.Equal(t, failure.System, failure.ClassOf(err), "an admin's mistake, not the job's")
	assert.Contains(t, err.Error(), "not the pinned auth.runas.sha256")
	assert.NoFileExists(t, ran)

	r = writeScript(t, "touch "+ran+"\n")
	require.NoError(t, os.Chmod(r.ValidationScript, 0o775))
	_, err = runasDecider(r).Decide(context.Background(), claims("alice"), "")
	require.Error(t, err)
	assert.Contains(t, err.Error(), "writable only by its owner")
	assert.NoFileExists(t, ran)

	r = writeScript(t, "touch "+ran+"\n")
	_, err = runasDecider(r).Decide(context.Background(), claims("alice"), "")
	require.NoError(t, err)
	assert.FileExists(t, ran, "the pinned script runs")
}
