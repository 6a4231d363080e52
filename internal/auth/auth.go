// Package auth decides which registry credentials an image pull gets, in
// seed 004's priority:
//
//  1. the user's own CI/CD variables (CH_IMAGE_USERNAME + CH_IMAGE_PASSWORD
//     for Charliecloud, APPTAINER_DOCKER_USERNAME + _PASSWORD for Apptainer);
//  2. gitlab-ci-token + the job token, only when the image's registry
//     host:port is exactly the job's CI_REGISTRY;
//  3. nothing (anonymous).
//
// The job token and CI_REGISTRY are read from the trusted JOB_RESPONSE_FILE,
// never from CUSTOM_ENV_ variables: a user can define a CI/CD variable named
// CI_REGISTRY, and the runner would pass it on, which would otherwise send
// the job token to a registry of the user's choosing.
//
// A Credential is a value that formats without its password, so it can be
// logged, compared and stored in a struct without leaking the secret.
package auth

import (
	"fmt"
	"strings"

	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/job"
)

// JobTokenUser is the user name GitLab's registry expects with a job token.
const JobTokenUser = "gitlab-ci-token"

// Source says where a credential came from; it decides the failure class
// when a registry refuses it (see docs/charliecloud.md, "Exit classes").
type Source int

const (
	// Anonymous: no credentials.
	Anonymous Source = iota
	// UserVariables: the user's own CI/CD variables.
	UserVariables
	// JobToken: gitlab-ci-token and the job's token.
	JobToken
)

func (s Source) String() string {
	switch s {
	case UserVariables:
		return "user variables"
	case JobToken:
		return "job token"
	default:
		return "anonymous"
	}
}

// VariableNames are the job variables a user sets to give their own
// credentials; each runtime has its own names.
type VariableNames struct {
	Username string
	Password string
}

// Credential is what one pull authenticates with. The zero value is
// anonymous.
type Credential struct {
	Source   Source
	Username string
	// Registry is the host[:port] the credential was chosen for.
	Registry string
	password string
}

// Password returns the secret; only a runtime's child environment may use it.
func (c Credential) Password() string { return c.password }

// Anonymous reports whether the pull goes without credentials.
func (c Credential) Anonymous() bool { return c.Source == Anonymous }

// String is the log form: the source and the user, never the password.
func (c Credential) String() string {
	if c.Source == Anonymous {
		return "anonymous"
	}
	return fmt.Sprintf("%s (user %s) for %s", c.Source, c.Username, c.Registry)
}

// GoString keeps %#v from printing the password field.
func (c Credential) GoString() string { return "auth.Credential{" + c.String() + "}" }

// Env returns the credential as NAME=value pairs for a child process's
// environment (the only place the password may travel), or nil when
// anonymous.
func (c Credential) Env(names VariableNames) []string {
	if c.Source == Anonymous {
		return nil
	}
	return []string{names.Username + "=" + c.Username, names.Password + "=" + c.password}
}

// Choose picks the credential for pulling an image from registry (the
// image's host[:port], e.g. "127.0.0.1:5443" or "docker.io").
//
// A user who sets only one of the two variables gets a user error: half a
// credential is always a mistake, and silently falling back to the job
// token or anonymous access would hide it.
func Choose(j *job.Job, registry string, names VariableNames) (Credential, error) {
	user, hasUser := j.Vars[names.Username]
	pass, hasPass := j.Vars[names.Password]
	switch {
	case user != "" && pass != "":
		return Credential{Source: UserVariables, Username: user, Registry: registry, password: pass}, nil
	case hasUser && user != "" || hasPass && pass != "":
		missing := names.Password
		if user == "" {
			missing = names.Username
		}
		return Credential{}, failure.Userf("registry credentials: %s is not set; set both %s and %s as CI/CD variables, or neither",
			missing, names.Username, names.Password)
	}
	if tok := j.Token(); tok != "" && SameRegistry(registry, trustedRegistry(j)) {
		return Credential{Source: JobToken, Username: JobTokenUser, Registry: registry, password: tok}, nil
	}
	return Credential{}, nil
}

// trustedRegistry is CI_REGISTRY from the trusted job payload ("" if none).
func trustedRegistry(j *job.Job) string {
	v, _ := j.TrustedVar("CI_REGISTRY")
	return v
}

// SameRegistry reports whether an image's registry is exactly the job's
// CI_REGISTRY: same host (case-insensitive, as DNS is) and same port. No
// default ports are filled in and no names are resolved, so
// "localhost:5443" is not "127.0.0.1:5443" and "r.example.com" is not
// "r.example.com:443": a token goes only where GitLab said it may.
func SameRegistry(imageRegistry, ciRegistry string) bool {
	ciRegistry = strings.TrimSpace(ciRegistry)
	if imageRegistry == "" || ciRegistry == "" || strings.ContainsAny(ciRegistry, "/@ ") {
		return false
	}
	return strings.EqualFold(imageRegistry, ciRegistry)
}
