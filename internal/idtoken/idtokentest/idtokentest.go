// Package idtokentest mints GitLab-style CI ID tokens with keys generated
// in the test, and writes the matching JWKS, for unit and integration
// tests of identity verification. Never for production use.
package idtokentest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/ci-exec/ci-exec/internal/idtoken"
)

// Issuer is a fake GitLab: an RSA (RS256) and an ECDSA P-256 (ES256)
// signing key, published under their key ids.
type Issuer struct {
	URL    string
	RSA    *rsa.PrivateKey
	EC     *ecdsa.PrivateKey
	RSAKID string
	ECKID  string
}

// New generates the keys of an issuer at url.
func New(t testing.TB, url string) *Issuer {
	t.Helper()
	rk, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	ek, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return &Issuer{URL: url, RSA: rk, EC: ek, RSAKID: "rsa-test-key", ECKID: "ec-test-key"}
}

// JWKS is the public key set, as GitLab serves it at /oauth/discovery/keys.
func (i *Issuer) JWKS() []byte {
	ks := jose.JSONWebKeySet{Keys: []jose.JSONWebKey{
		{Key: i.RSA.Public(), KeyID: i.RSAKID, Algorithm: string(jose.RS256), Use: "sig"},
		{Key: i.EC.Public(), KeyID: i.ECKID, Algorithm: string(jose.ES256), Use: "sig"},
	}}
	b, err := json.Marshal(ks)
	if err != nil {
		panic(err)
	}
	return b
}

// WriteJWKS writes the JWKS to dir/jwks.json and returns its path.
func (i *Issuer) WriteJWKS(t testing.TB, dir string) string {
	t.Helper()
	p := filepath.Join(dir, "jwks.json")
	if err := os.WriteFile(p, i.JWKS(), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// Claims returns the claims GitLab puts in a job's ID token for user
// (uid-like user id 42), job jobID, audience aud, valid from now for an hour.
func (i *Issuer) Claims(user, jobID, aud string, now time.Time) idtoken.Claims {
	return idtoken.Claims{
		Claims: jwt.Claims{
			Issuer:    i.URL,
			Subject:   "project_path:hpc/app:ref_type:branch:ref:main",
			Audience:  jwt.Audience{aud},
			Expiry:    jwt.NewNumericDate(now.Add(time.Hour)),
			NotBefore: jwt.NewNumericDate(now.Add(-5 * time.Second)),
			IssuedAt:  jwt.NewNumericDate(now.Add(-5 * time.Second)),
			ID:        "jti-" + jobID,
		},
		UserLogin:      user,
		UserID:         "42",
		UserEmail:      user + "@example.com",
		NamespaceID:    "7",
		NamespacePath:  "hpc",
		ProjectID:      "99",
		ProjectPath:    "hpc/app",
		PipelineID:     strconv.Itoa(1000),
		PipelineSource: "push",
		JobID:          jobID,
		Ref:            "main",
		RefType:        "branch",
		RefProtected:   "true",
	}
}

// Option changes how a token is signed.
type Option func(*mint)

type mint struct {
	alg jose.SignatureAlgorithm
	key crypto.Signer
	kid string
}

// ES256 signs with the ECDSA key instead of RSA.
func ES256() Option {
	return func(m *mint) { m.alg = jose.ES256 }
}

// SignWith signs with another key (a forger's) under key id kid.
func SignWith(alg jose.SignatureAlgorithm, key crypto.Signer, kid string) Option {
	return func(m *mint) { m.alg, m.key, m.kid = alg, key, kid }
}

// KeyID overrides the key id in the header.
func KeyID(kid string) Option { return func(m *mint) { m.kid = kid } }

// Mint signs c (RS256 with the issuer's RSA key unless told otherwise).
func (i *Issuer) Mint(t testing.TB, c idtoken.Claims, opts ...Option) string {
	t.Helper()
	m := mint{alg: jose.RS256}
	for _, o := range opts {
		o(&m)
	}
	if m.key == nil {
		if m.alg == jose.ES256 {
			m.key = i.EC
		} else {
			m.key = i.RSA
		}
	}
	if m.kid == "" {
		if m.alg == jose.ES256 {
			m.kid = i.ECKID
		} else {
			m.kid = i.RSAKID
		}
	}
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: m.alg, Key: m.key},
		(&jose.SignerOptions{}).WithType("JWT").WithHeader(jose.HeaderKey("kid"), m.kid))
	if err != nil {
		t.Fatal(err)
	}
	s, err := jwt.Signed(sig).Claims(c).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return s
}
