// Package idtoken verifies a GitLab CI ID token (the job's `id_tokens:`
// JWT) and returns its claims: the only source of a job's identity that the
// job itself cannot forge. Variables such as GITLAB_USER_LOGIN come from
// the job payload a `.gitlab-ci.yml` can override; a token's claims are
// signed by the trusted GitLab server.
//
// Verification: the signature against the server's JWKS (RS256 or ES256
// only: never "none" or a shared-secret HS* algorithm, which would let
// anyone holding the public key sign), `iss` equal to the trusted
// gitlab_server, `aud` containing the configured audience, `exp`, `nbf` and
// `iat` within Leeway, and `job_id` equal to the job id from the runner's
// trusted JOB_RESPONSE_FILE, so that a token copied from another job is
// refused.
//
// Every failure is an *Error with a Kind, wrapped in a failure class: a
// JWKS that cannot be had is a system failure (the runner retries), every
// other kind is the job's (retrying cannot help) and its message says what
// to change.
package idtoken

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/ci-exec/ci-exec/internal/failure"
)

// Leeway is the clock skew tolerated on exp, nbf and iat.
const Leeway = 60 * time.Second

// Algorithms are the only signature algorithms accepted (GitLab signs
// with RS256; ES256 for keys a site mints itself).
var Algorithms = []jose.SignatureAlgorithm{jose.RS256, jose.ES256}

// Kind is why a token was refused.
type Kind int

const (
	// Missing: the job has no token in the configured variable.
	Missing Kind = iota + 1
	// Malformed: not a compact signed JWT, or a required claim is absent.
	Malformed
	// BadSignature: refused algorithm, unknown key id, or a signature that
	// does not verify.
	BadSignature
	// WrongIssuer: `iss` is not the trusted gitlab_server.
	WrongIssuer
	// WrongAudience: `aud` lacks the configured audience.
	WrongAudience
	// Expired: `exp` is past (beyond Leeway).
	Expired
	// NotYetValid: `nbf` or `iat` is in the future (beyond Leeway).
	NotYetValid
	// JobMismatch: the token was issued for another job.
	JobMismatch
	// JWKSUnavailable: the signing keys could not be read or fetched.
	JWKSUnavailable
)

func (k Kind) String() string {
	switch k {
	case Missing:
		return "missing token"
	case Malformed:
		return "malformed token"
	case BadSignature:
		return "bad signature"
	case WrongIssuer:
		return "wrong issuer"
	case WrongAudience:
		return "wrong audience"
	case Expired:
		return "expired"
	case NotYetValid:
		return "not yet valid"
	case JobMismatch:
		return "job id mismatch"
	case JWKSUnavailable:
		return "JWKS unavailable"
	}
	return "unknown"
}

// Class is who must act: only JWKSUnavailable is the infrastructure's.
func (k Kind) Class() failure.Class {
	if k == JWKSUnavailable {
		return failure.System
	}
	return failure.User
}

// Error is a refused token.
type Error struct {
	Kind Kind
	Msg  string
	Err  error
}

func (e *Error) Error() string {
	if e.Err != nil {
		return e.Msg + ": " + e.Err.Error()
	}
	return e.Msg
}

func (e *Error) Unwrap() error { return e.Err }

// KindOf returns the Kind of a verification error, or 0.
func KindOf(err error) Kind {
	var e *Error
	if errors.As(err, &e) {
		return e.Kind
	}
	return 0
}

func fail(k Kind, err error, format string, args ...any) error {
	return &failure.Error{Class: k.Class(), Err: &Error{Kind: k, Msg: fmt.Sprintf(format, args...), Err: err}}
}

// Claims are the verified claims of a GitLab CI ID token. GitLab writes
// its ids as JSON strings; they are kept as strings.
type Claims struct {
	jwt.Claims
	UserLogin      string `json:"user_login"`
	UserID         string `json:"user_id"`
	UserEmail      string `json:"user_email,omitempty"`
	NamespaceID    string `json:"namespace_id"`
	NamespacePath  string `json:"namespace_path"`
	ProjectID      string `json:"project_id"`
	ProjectPath    string `json:"project_path"`
	PipelineID     string `json:"pipeline_id"`
	PipelineSource string `json:"pipeline_source,omitempty"`
	JobID          string `json:"job_id"`
	Ref            string `json:"ref,omitempty"`
	RefType        string `json:"ref_type,omitempty"`
	RefProtected   string `json:"ref_protected,omitempty"`
}

// Env returns the claims as CI_EXEC_CLAIM_<NAME>=value pairs (for an admin
// script), in a fixed order, leaving out empty ones.
func (c *Claims) Env() []string {
	var out []string
	for _, kv := range [][2]string{
		{"ISS", c.Issuer}, {"SUB", c.Subject}, {"USER_LOGIN", c.UserLogin}, {"USER_ID", c.UserID},
		{"USER_EMAIL", c.UserEmail}, {"NAMESPACE_ID", c.NamespaceID}, {"NAMESPACE_PATH", c.NamespacePath},
		{"PROJECT_ID", c.ProjectID}, {"PROJECT_PATH", c.ProjectPath}, {"PIPELINE_ID", c.PipelineID},
		{"PIPELINE_SOURCE", c.PipelineSource}, {"JOB_ID", c.JobID}, {"REF", c.Ref}, {"REF_TYPE", c.RefType},
		{"REF_PROTECTED", c.RefProtected},
	} {
		if kv[1] != "" {
			out = append(out, "CI_EXEC_CLAIM_"+kv[0]+"="+kv[1])
		}
	}
	return out
}

// KeySource yields the JWKS. refresh asks for fresh keys (after an unknown
// key id: GitLab may have rotated its keys since they were cached).
type KeySource interface {
	Keys(ctx context.Context, refresh bool) (*jose.JSONWebKeySet, error)
	// String names where the keys come from, for messages.
	String() string
}

// Verifier checks tokens for one runner configuration.
type Verifier struct {
	// Issuer is the trusted gitlab_server (trailing slashes ignored).
	Issuer string
	// Audience must be one of the token's `aud`.
	Audience string
	// Variable is the job variable the token came from (jwt_env_variable),
	// named in messages.
	Variable string
	Keys     KeySource
	// Now is the clock (default time.Now).
	Now func() time.Time
}

// IDTokensYAML is the `id_tokens:` block a job needs, in block style, for
// docs and multi-line job-log hints.
func IDTokensYAML(variable, audience string) string {
	return fmt.Sprintf("id_tokens:\n  %s:\n    aud: %s\n", variable, audience)
}

// idTokensFlow is the same block in YAML flow style: one line, still
// valid YAML to paste into a job.
func idTokensFlow(variable, audience string) string {
	return fmt.Sprintf("id_tokens: {%s: {aud: %q}}", variable, audience)
}

func normalise(s string) string { return strings.TrimRight(s, "/") }

// Verify checks raw (the value of the job's token variable; "" when the
// job has none) and returns its claims. jobID is the id from the runner's
// JOB_RESPONSE_FILE, never a job variable.
func (v *Verifier) Verify(ctx context.Context, raw, jobID string) (*Claims, error) {
	if jobID == "" {
		// Without the trusted id any job's token would do.
		return nil, failure.Systemf("verify ID token: no job id from JOB_RESPONSE_FILE")
	}
	raw = strings.TrimSpace(raw)
	if raw == "" {
		return nil, fail(Missing, nil, "the job has no ID token in variable %s, which this runner needs to know who runs the job: add `%s` to the job in .gitlab-ci.yml (or to a default: or include: template for every job)",
			v.Variable, idTokensFlow(v.Variable, v.Audience))
	}
	alg, kid, err := peekHeader(raw)
	if err != nil {
		return nil, fail(Malformed, err, "the ID token in %s is not a signed JWT; set it from id_tokens: in .gitlab-ci.yml, not by hand", v.Variable)
	}
	if !slices.Contains(Algorithms, jose.SignatureAlgorithm(alg)) {
		return nil, fail(BadSignature, nil, "the ID token in %s is signed with algorithm %q; only RS256 and ES256 are accepted (a GitLab ID token is RS256)", v.Variable, alg)
	}
	tok, err := jwt.ParseSigned(raw, Algorithms)
	if err != nil {
		return nil, fail(Malformed, err, "the ID token in %s is not a signed JWT; set it from id_tokens: in .gitlab-ci.yml, not by hand", v.Variable)
	}
	var c Claims
	if err := v.verifySignature(ctx, tok, kid, &c); err != nil {
		return nil, err
	}
	if err := v.checkClaims(&c, jobID); err != nil {
		return nil, err
	}
	return &c, nil
}

// peekHeader reads alg and kid from the JOSE header, so that a refused
// algorithm is named as such rather than as a parse error.
func peekHeader(raw string) (alg, kid string, err error) {
	parts := strings.Split(raw, ".")
	if len(parts) != 3 {
		return "", "", fmt.Errorf("%d parts, want 3", len(parts))
	}
	b, err := base64.RawURLEncoding.DecodeString(parts[0])
	if err != nil {
		return "", "", fmt.Errorf("header: %v", err)
	}
	var h struct {
		Alg string `json:"alg"`
		Kid string `json:"kid"`
	}
	if err := json.Unmarshal(b, &h); err != nil {
		return "", "", fmt.Errorf("header: %v", err)
	}
	return h.Alg, h.Kid, nil
}

func (v *Verifier) verifySignature(ctx context.Context, tok *jwt.JSONWebToken, kid string, c *Claims) error {
	candidates := func(refresh bool) ([]jose.JSONWebKey, error) {
		ks, err := v.Keys.Keys(ctx, refresh)
		if err != nil {
			return nil, fail(JWKSUnavailable, err, "cannot get GitLab's ID token signing keys from %s", v.Keys)
		}
		if kid == "" {
			return ks.Keys, nil
		}
		return ks.Key(kid), nil
	}
	keys, err := candidates(false)
	if err != nil {
		return err
	}
	if len(keys) == 0 {
		// GitLab may have rotated its keys since they were cached.
		if keys, err = candidates(true); err != nil {
			return err
		}
	}
	if len(keys) == 0 {
		return fail(BadSignature, nil, "the ID token in %s is signed with key id %q, which is not among GitLab's keys (%s): the token was not issued by %s", v.Variable, kid, v.Keys, normalise(v.Issuer))
	}
	var lastErr error
	for _, k := range keys {
		if k.Use == "enc" {
			continue
		}
		if err := tok.Claims(k.Key, c); err != nil {
			lastErr = err
			continue
		}
		return nil
	}
	return fail(BadSignature, lastErr, "the signature of the ID token in %s does not verify against GitLab's key %q (%s): the token was forged or altered", v.Variable, kid, v.Keys)
}

func (v *Verifier) checkClaims(c *Claims, jobID string) error {
	want := normalise(v.Issuer)
	if normalise(c.Issuer) != want {
		return fail(WrongIssuer, nil, "the ID token in %s was issued by %q; this runner trusts only %q", v.Variable, c.Issuer, want)
	}
	if !slices.Contains([]string(c.Audience), v.Audience) {
		return fail(WrongAudience, nil, "the ID token in %s has audience %s, but this runner expects %q: set `aud: %s` under id_tokens: %s: in .gitlab-ci.yml",
			v.Variable, quoteList(c.Audience), v.Audience, v.Audience, v.Variable)
	}
	now := time.Now
	if v.Now != nil {
		now = v.Now
	}
	t := now()
	if c.Expiry == nil {
		return fail(Malformed, nil, "the ID token in %s has no expiry (exp); only GitLab-issued ID tokens are accepted", v.Variable)
	}
	if exp := c.Expiry.Time(); t.After(exp.Add(Leeway)) {
		return fail(Expired, nil, "the ID token in %s expired at %s (now %s): retry the job; a token is valid only while its job runs", v.Variable, utc(exp), utc(t))
	}
	if c.NotBefore != nil {
		if nbf := c.NotBefore.Time(); t.Add(Leeway).Before(nbf) {
			return fail(NotYetValid, nil, "the ID token in %s is not valid before %s (now %s): the clocks of GitLab and this runner host differ; tell the admins", v.Variable, utc(nbf), utc(t))
		}
	}
	if c.IssuedAt != nil {
		if iat := c.IssuedAt.Time(); t.Add(Leeway).Before(iat) {
			return fail(NotYetValid, nil, "the ID token in %s is issued in the future, at %s (now %s): the clocks of GitLab and this runner host differ; tell the admins", v.Variable, utc(iat), utc(t))
		}
	}
	if c.UserLogin == "" {
		return fail(Malformed, nil, "the ID token in %s has no user_login claim; only GitLab-issued CI ID tokens are accepted", v.Variable)
	}
	if c.JobID != jobID {
		return fail(JobMismatch, nil, "the ID token in %s belongs to job %q, not to this job %q: use the token GitLab issues to this job (id_tokens:), never one copied from another job", v.Variable, c.JobID, jobID)
	}
	return nil
}

func utc(t time.Time) string { return t.UTC().Format(time.RFC3339) }

func quoteList(ss []string) string {
	if len(ss) == 0 {
		return "none"
	}
	q := make([]string, len(ss))
	for i, s := range ss {
		q[i] = fmt.Sprintf("%q", s)
	}
	return strings.Join(q, ", ")
}
