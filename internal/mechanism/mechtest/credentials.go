package mechtest

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/job"
)

// Creds makes credentials by the real choice (auth.Choose) for a runtime
// whose users set the job variables Names; their variables name User.
type Creds struct {
	Names auth.VariableNames
	User  string
}

// FromUser is the credential of the user's own variables, with password,
// for an image on registry.
func (c Creds) FromUser(t *testing.T, registry, password string) auth.Credential {
	t.Helper()
	j := &job.Job{Vars: map[string]string{c.Names.Username: c.User, c.Names.Password: password}}
	return c.choose(t, j, registry, auth.UserVariables)
}

// JobToken is gitlab-ci-token with the job's token, chosen because the
// image's registry is the job's trusted CI_REGISTRY.
func (c Creds) JobToken(t *testing.T, registry, token string) auth.Credential {
	t.Helper()
	j := &job.Job{
		Vars: map[string]string{},
		Response: &job.Response{
			Token:     token,
			Variables: []job.Variable{{Key: "CI_REGISTRY", Value: registry, Public: true}},
		},
	}
	cred := c.choose(t, j, registry, auth.JobToken)
	require.Equal(t, auth.JobTokenUser, cred.Username)
	return cred
}

// choose runs the real credential choice and checks that the expected
// kind came out.
func (c Creds) choose(t *testing.T, j *job.Job, registry string, want auth.Source) auth.Credential {
	t.Helper()
	cred, err := auth.Choose(j, registry, c.Names)
	require.NoError(t, err)
	require.Equal(t, want, cred.Source, cred.String())
	return cred
}

// Anonymous is no credential at all.
func Anonymous(*testing.T) auth.Credential { return auth.Credential{} }

// Secrets are the passwords and tokens of a test suite, which must never
// appear in argv, error messages or job logs.
type Secrets []string

// AssertAbsent fails when any of ss carries a secret; what names them.
func (s Secrets) AssertAbsent(t *testing.T, what string, ss ...string) {
	t.Helper()
	for _, x := range ss {
		for _, secret := range s {
			require.NotContains(t, x, secret, "%s leaks a secret", what)
		}
	}
}

// AssertCarriedIn checks that cred's secret travels in env (KEY=VALUE) in
// exactly the variable key, or nowhere for an anonymous cred.
func (s Secrets) AssertCarriedIn(t *testing.T, env []string, cred auth.Credential, key string) {
	t.Helper()
	var carriers []string
	for _, kv := range env {
		for _, secret := range s {
			if strings.Contains(kv, secret) {
				k, _, _ := strings.Cut(kv, "=")
				carriers = append(carriers, k)
				break
			}
		}
	}
	if cred.Anonymous() {
		assert.Empty(t, carriers)
	} else {
		assert.Equal(t, []string{key}, carriers, "the secret travels in exactly one variable")
	}
}
