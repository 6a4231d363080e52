// Package authz decides the local account a job runs as, from the claims
// of its verified ID token (package idtoken) and the admin's [auth] rules.
// It never reads the process environment, GITLAB_USER_LOGIN or any
// CUSTOM_ENV_ variable: those come from the job payload, which a
// .gitlab-ci.yml can set to anyone's name.
//
// The account is the token's user_login, unless the admin's RunAs script
// (auth.runas) approves another: it sees the claims and the account a job
// asked for in auth.runas.user_variable and may name the account. Then the
// rules, each denial naming the rule and the user: user and group
// blocklists, user and group allowlists (either admits), namespace
// blocklist and allowlist, root (refused unless allow_root), min_uid.
package authz

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/idtoken"
)

// Account is a resolved local account.
type Account struct {
	Name  string
	UID   int
	GID   int
	Home  string
	Shell string
	Group []string // names of the primary and supplementary groups
	// GIDs are the primary and supplementary group ids (what initgroups
	// would set).
	GIDs []uint32
}

// Accounts looks local accounts up.
type Accounts interface {
	// Lookup returns the account, or an error wrapping
	// user.UnknownUserError when there is none.
	Lookup(name string) (*Account, error)
}

// OSAccounts looks accounts up with os/user (NSS: files, LDAP, SSSD).
type OSAccounts struct{}

// Lookup resolves name and its groups.
func (OSAccounts) Lookup(name string) (*Account, error) {
	u, err := user.Lookup(name)
	if err != nil {
		return nil, err
	}
	uid, err1 := strconv.Atoi(u.Uid)
	gid, err2 := strconv.Atoi(u.Gid)
	if err := errors.Join(err1, err2); err != nil {
		return nil, fmt.Errorf("account %s: %v", name, err)
	}
	a := &Account{Name: u.Username, UID: uid, GID: gid, Home: u.HomeDir}
	gids, err := u.GroupIds()
	if err != nil {
		return nil, fmt.Errorf("groups of %s: %v", name, err)
	}
	for _, g := range gids {
		n, err := strconv.ParseUint(g, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("groups of %s: gid %q: %v", name, g, err)
		}
		a.GIDs = append(a.GIDs, uint32(n))
		if grp, err := user.LookupGroupId(g); err == nil {
			a.Group = append(a.Group, grp.Name)
		}
	}
	a.Shell = loginShell(u.Username)
	return a, nil
}

// RunAs is the admin's approval of the account a job runs as.
type RunAs interface {
	// Approve returns the account the job may run as: requested (the job's
	// auth.runas.user_variable, "" when it asks for none) or another the
	// admin's rule names; a refusal is an error.
	Approve(ctx context.Context, c *idtoken.Claims, requested string) (string, error)
}

// Decision is who a job runs as, and why.
type Decision struct {
	// GitLabUser is the token's user_login.
	GitLabUser string
	Account    Account
	// Via is "user_login" or "runas".
	Via string
}

// Decider applies one configuration's rules.
type Decider struct {
	Auth     config.Auth
	Accounts Accounts
	// RunAs is consulted when auth.runas.validation_script is set.
	RunAs RunAs
	// Host names this machine in messages (default os.Hostname).
	Host string
}

func (d *Decider) host() string {
	if d.Host != "" {
		return d.Host
	}
	h, _ := os.Hostname()
	return h
}

// Decide returns the account for the verified claims c. requested is the
// value of the job's auth.runas.user_variable ("" when unset or not
// configured): only the RunAs script can make it count.
func (d *Decider) Decide(ctx context.Context, c *idtoken.Claims, requested string) (*Decision, error) {
	login := c.UserLogin
	if login == "" {
		return nil, failure.Userf("the ID token names no GitLab user (user_login)")
	}
	name, via := login, "user_login"
	if d.Auth.RunAs.ValidationScript != "" {
		if d.RunAs == nil {
			return nil, failure.Systemf("auth.runas.validation_script is set but no RunAs checker is wired")
		}
		if d.Auth.RunAs.UserVariable == "" {
			requested = ""
		}
		got, err := d.RunAs.Approve(ctx, c, requested)
		if err != nil {
			return nil, err
		}
		if got != "" && got != login {
			name, via = got, "runas"
		}
	}
	acct, err := d.Accounts.Lookup(name)
	if err != nil {
		var unknown user.UnknownUserError
		if errors.As(err, &unknown) {
			if via == "runas" {
				return nil, failure.Userf("GitLab user %q: the account %q approved by auth.runas does not exist on host %s; ask the admins", login, name, d.host())
			}
			return nil, failure.Userf("GitLab user %q has no local account %q on host %s: ask the admins to create it (or to map it with auth.runas)", login, name, d.host())
		}
		return nil, failure.Systemf("look up local account %q for GitLab user %q on host %s: %v", name, login, d.host(), err)
	}
	if err := d.check(c, login, acct); err != nil {
		return nil, err
	}
	return &Decision{GitLabUser: login, Account: *acct, Via: via}, nil
}

func (d *Decider) check(c *idtoken.Claims, login string, a *Account) error {
	r := &d.Auth
	who := fmt.Sprintf("GitLab user %q (local account %q)", login, a.Name)
	deny := func(format string, args ...any) error {
		return failure.Userf("%s is denied: %s", who, fmt.Sprintf(format, args...))
	}
	if slices.Contains(r.UserBlocklist, a.Name) {
		return deny("the account is in auth.user_blocklist")
	}
	for _, g := range a.Group {
		if slices.Contains(r.GroupsBlocklist, g) {
			return deny("its group %q is in auth.groups_blocklist", g)
		}
	}
	if len(r.UserAllowlist) > 0 || len(r.GroupsAllowlist) > 0 {
		inGroup := slices.ContainsFunc(a.Group, func(g string) bool { return slices.Contains(r.GroupsAllowlist, g) })
		if !slices.Contains(r.UserAllowlist, a.Name) && !inGroup {
			return deny("the account is neither in auth.user_allowlist nor in a group of auth.groups_allowlist")
		}
	}
	paths := []string{c.NamespacePath, c.ProjectPath}
	for _, p := range paths {
		if p != "" && config.MatchAny(r.NamespaceBlocklist, p) {
			return deny("project %q (namespace %q) matches auth.namespace_blocklist", c.ProjectPath, c.NamespacePath)
		}
	}
	if len(r.NamespaceAllowlist) > 0 && !slices.ContainsFunc(paths, func(p string) bool { return p != "" && config.MatchAny(r.NamespaceAllowlist, p) }) {
		return deny("project %q (namespace %q) matches no entry of auth.namespace_allowlist", c.ProjectPath, c.NamespacePath)
	}
	if a.UID == 0 {
		if !r.AllowRoot {
			return deny("jobs never run as root (uid 0) unless auth.allow_root = true")
		}
		return nil
	}
	if a.UID < r.MinUID {
		return deny("uid %d is below auth.min_uid %d", a.UID, r.MinUID)
	}
	return nil
}

// loginShell is the account's login shell from the passwd database:
// /etc/passwd first (no process to start on every stage), then NSS through
// getent (LDAP and SSSD accounts; os/user does not return the shell), else
// /bin/sh.
func loginShell(name string) string {
	if b, err := os.ReadFile("/etc/passwd"); err == nil {
		if sh := shellField(string(b), name); sh != "" {
			return sh
		}
	}
	if out, err := exec.Command("getent", "passwd", name).Output(); err == nil {
		if sh := shellField(string(out), name); sh != "" {
			return sh
		}
	}
	return "/bin/sh"
}

// shellField finds name's shell in passwd-format lines.
func shellField(db, name string) string {
	for _, line := range strings.Split(db, "\n") {
		f := strings.Split(strings.TrimSpace(line), ":")
		if len(f) == 7 && f[0] == name && filepath.IsAbs(f[6]) {
			return f[6]
		}
	}
	return ""
}
