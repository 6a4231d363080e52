package idtoken_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/idtoken"
	"github.com/ci-exec/ci-exec/internal/idtoken/idtokentest"
)

const (
	server = "https://gitlab.example.com"
	jobID  = "4711"
)

var now = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

func setup(t *testing.T) (*idtokentest.Issuer, *idtoken.Verifier) {
	iss := idtokentest.New(t, server)
	v := &idtoken.Verifier{
		Issuer:   server + "/",
		Audience: server,
		Variable: "SITE_ID_TOKEN",
		Keys:     idtoken.FileKeys{Path: iss.WriteJWKS(t, t.TempDir())},
		Now:      func() time.Time { return now },
	}
	return iss, v
}

// refused checks the kind, the class and the one-line message of err.
func refused(t *testing.T, err error, kind idtoken.Kind, want ...string) {
	t.Helper()
	require.Error(t, err)
	assert.Equal(t, kind, idtoken.KindOf(err), "kind of %v", err)
	assert.Equal(t, kind.Class(), failure.ClassOf(err))
	assert.NotContains(t, err.Error(), "\n")
	for _, w := range want {
		assert.Contains(t, err.Error(), w)
	}
}

func TestVerifyGood(t *testing.T) {
	iss, v := setup(t)
	for name, opts := range map[string][]idtokentest.Option{"RS256": nil, "ES256": {idtokentest.ES256()}} {
		t.Run(name, func(t *testing.T) {
			raw := iss.Mint(t, iss.Claims("alice", jobID, server, now), opts...)
			c, err := v.Verify(context.Background(), raw, jobID)
			require.NoError(t, err)
			assert.Equal(t, "alice", c.UserLogin)
			assert.Equal(t, "42", c.UserID)
			assert.Equal(t, "hpc", c.NamespacePath)
			assert.Equal(t, "hpc/app", c.ProjectPath)
			assert.Equal(t, "1000", c.PipelineID)
			assert.Equal(t, jobID, c.JobID)
			assert.Equal(t, "main", c.Ref)
			assert.Contains(t, c.Env(), "CI_EXEC_CLAIM_USER_LOGIN=alice")
			assert.Contains(t, c.Env(), "CI_EXEC_CLAIM_PROJECT_PATH=hpc/app")
		})
	}
}

func TestMissingTokenSaysWhatToAdd(t *testing.T) {
	_, v := setup(t)
	_, err := v.Verify(context.Background(), "  ", jobID)
	refused(t, err, idtoken.Missing, "no ID token in variable SITE_ID_TOKEN",
		`add `+"`"+`id_tokens: {SITE_ID_TOKEN: {aud: "https://gitlab.example.com"}}`+"`", ".gitlab-ci.yml")
	assert.Equal(t, failure.User, failure.ClassOf(err))
	assert.Equal(t, "id_tokens:\n  SITE_ID_TOKEN:\n    aud: https://gitlab.example.com\n", idtoken.IDTokensYAML("SITE_ID_TOKEN", server))
}

func TestRefusedAlgorithms(t *testing.T) {
	iss, v := setup(t)
	good := iss.Mint(t, iss.Claims("alice", jobID, server, now))
	parts := strings.Split(good, ".")
	b64 := base64.RawURLEncoding.EncodeToString

	// alg "none": the claims unsigned.
	none := b64([]byte(`{"alg":"none","typ":"JWT"}`)) + "." + parts[1] + "."
	_, err := v.Verify(context.Background(), none, jobID)
	refused(t, err, idtoken.BadSignature, `signed with algorithm "none"`, "only RS256 and ES256")

	// HS256 keyed with the RSA public key: the classic algorithm confusion.
	pub, err := jose.JSONWebKey{Key: iss.RSA.Public()}.MarshalJSON()
	require.NoError(t, err)
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.HS256, Key: pub}, (&jose.SignerOptions{}).WithHeader("kid", iss.RSAKID))
	require.NoError(t, err)
	hs, err := jwt.Signed(sig).Claims(iss.Claims("alice", jobID, server, now)).Serialize()
	require.NoError(t, err)
	_, err = v.Verify(context.Background(), hs, jobID)
	refused(t, err, idtoken.BadSignature, `signed with algorithm "HS256"`)

	_, err = v.Verify(context.Background(), "not-a-jwt", jobID)
	refused(t, err, idtoken.Malformed, "is not a signed JWT")
}

func TestForgedAndUnknownKeys(t *testing.T) {
	iss, v := setup(t)
	c := iss.Claims("alice", jobID, server, now)

	forger, err := rsa.GenerateKey(rand.Reader, 2048)
	require.NoError(t, err)
	_, err = v.Verify(context.Background(), iss.Mint(t, c, idtokentest.SignWith(jose.RS256, forger, iss.RSAKID)), jobID)
	refused(t, err, idtoken.BadSignature, `does not verify against GitLab's key "rsa-test-key"`, "forged or altered")

	ecForger, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	_, err = v.Verify(context.Background(), iss.Mint(t, c, idtokentest.SignWith(jose.ES256, ecForger, iss.ECKID)), jobID)
	refused(t, err, idtoken.BadSignature, "does not verify")

	// A valid RSA signature presented under the EC key's id.
	_, err = v.Verify(context.Background(), iss.Mint(t, c, idtokentest.KeyID(iss.ECKID)), jobID)
	refused(t, err, idtoken.BadSignature, "does not verify")

	_, err = v.Verify(context.Background(), iss.Mint(t, c, idtokentest.SignWith(jose.RS256, forger, "other-kid")), jobID)
	refused(t, err, idtoken.BadSignature, `key id "other-kid", which is not among GitLab's keys`)

	// Claims altered after signing.
	raw := iss.Mint(t, c)
	other := iss.Mint(t, iss.Claims("root", jobID, server, now))
	p, q := strings.Split(raw, "."), strings.Split(other, ".")
	_, err = v.Verify(context.Background(), p[0]+"."+q[1]+"."+p[2], jobID)
	refused(t, err, idtoken.BadSignature, "forged or altered")
}

func TestClaimChecks(t *testing.T) {
	iss, v := setup(t)
	ctx := context.Background()
	mint := func(edit func(*idtoken.Claims)) string {
		c := iss.Claims("alice", jobID, server, now)
		edit(&c)
		return iss.Mint(t, c)
	}

	_, err := v.Verify(ctx, mint(func(c *idtoken.Claims) { c.Issuer = "https://evil.example.com" }), jobID)
	refused(t, err, idtoken.WrongIssuer, `issued by "https://evil.example.com"`, `trusts only "https://gitlab.example.com"`)
	_, err = v.Verify(ctx, mint(func(c *idtoken.Claims) { c.Issuer = server + "/" }), jobID)
	assert.NoError(t, err, "a trailing slash on the issuer is the same server")

	_, err = v.Verify(ctx, mint(func(c *idtoken.Claims) { c.Audience = jwt.Audience{"https://other.example.com", "x"} }), jobID)
	refused(t, err, idtoken.WrongAudience, `audience "https://other.example.com", "x"`, `expects "https://gitlab.example.com"`, "aud: https://gitlab.example.com")
	_, err = v.Verify(ctx, mint(func(c *idtoken.Claims) { c.Audience = jwt.Audience{"x", server} }), jobID)
	assert.NoError(t, err, "one of several audiences")

	_, err = v.Verify(ctx, mint(func(c *idtoken.Claims) { c.Expiry = jwt.NewNumericDate(now.Add(-61 * time.Second)) }), jobID)
	refused(t, err, idtoken.Expired, "expired at 2026-03-01T11:58:59Z (now 2026-03-01T12:00:00Z)")
	_, err = v.Verify(ctx, mint(func(c *idtoken.Claims) { c.Expiry = jwt.NewNumericDate(now.Add(-59 * time.Second)) }), jobID)
	assert.NoError(t, err, "within the leeway")
	_, err = v.Verify(ctx, mint(func(c *idtoken.Claims) { c.Expiry = nil }), jobID)
	refused(t, err, idtoken.Malformed, "no expiry")

	_, err = v.Verify(ctx, mint(func(c *idtoken.Claims) { c.NotBefore = jwt.NewNumericDate(now.Add(2 * time.Minute)) }), jobID)
	refused(t, err, idtoken.NotYetValid, "not valid before 2026-03-01T12:02:00Z", "clocks")
	_, err = v.Verify(ctx, mint(func(c *idtoken.Claims) { c.NotBefore = jwt.NewNumericDate(now.Add(59 * time.Second)) }), jobID)
	assert.NoError(t, err, "within the leeway")
	_, err = v.Verify(ctx, mint(func(c *idtoken.Claims) { c.IssuedAt = jwt.NewNumericDate(now.Add(2 * time.Minute)) }), jobID)
	refused(t, err, idtoken.NotYetValid, "issued in the future")

	_, err = v.Verify(ctx, mint(func(c *idtoken.Claims) {}), "4712")
	refused(t, err, idtoken.JobMismatch, `belongs to job "4711", not to this job "4712"`)
	_, err = v.Verify(ctx, mint(func(c *idtoken.Claims) { c.UserLogin = "" }), jobID)
	refused(t, err, idtoken.Malformed, "no user_login")
	_, err = v.Verify(ctx, mint(func(c *idtoken.Claims) {}), "")
	assert.Equal(t, failure.System, failure.ClassOf(err), "no trusted job id is the caller's fault")
}

func TestJWKSFileUnreadableIsSystemFailure(t *testing.T) {
	iss, v := setup(t)
	v.Keys = idtoken.FileKeys{Path: filepath.Join(t.TempDir(), "absent.json")}
	_, err := v.Verify(context.Background(), iss.Mint(t, iss.Claims("alice", jobID, server, now)), jobID)
	refused(t, err, idtoken.JWKSUnavailable, "cannot get GitLab's ID token signing keys from file ")
	assert.Equal(t, failure.System, failure.ClassOf(err), "retried by the runner")
}

// countingKeys is a KeySource that records refreshes.
type countingKeys struct {
	ks       []*jose.JSONWebKeySet
	refreshs int
}

func (c *countingKeys) String() string { return "test keys" }
func (c *countingKeys) Keys(_ context.Context, refresh bool) (*jose.JSONWebKeySet, error) {
	if refresh {
		c.refreshs++
	}
	return c.ks[min(c.refreshs, len(c.ks)-1)], nil
}

func TestUnknownKidRefreshesOnce(t *testing.T) {
	iss, v := setup(t)
	old := idtokentest.New(t, server) // keys from before a rotation
	var oldKS, newKS jose.JSONWebKeySet
	require.NoError(t, json.Unmarshal(jwksWithKID(old, "old"), &oldKS))
	require.NoError(t, json.Unmarshal(iss.JWKS(), &newKS))
	ck := &countingKeys{ks: []*jose.JSONWebKeySet{&oldKS, &newKS}}
	v.Keys = ck
	_, err := v.Verify(context.Background(), iss.Mint(t, iss.Claims("alice", jobID, server, now)), jobID)
	require.NoError(t, err)
	assert.Equal(t, 1, ck.refreshs)
}

func jwksWithKID(i *idtokentest.Issuer, prefix string) []byte {
	i.RSAKID, i.ECKID = prefix+"-rsa", prefix+"-ec"
	return i.JWKS()
}

func TestHTTPKeysFetchAndCache(t *testing.T) {
	iss := idtokentest.New(t, server)
	var hits atomic.Int32
	fail := atomic.Bool{}
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		if fail.Load() || r.URL.Path != idtoken.KeysPath {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(iss.JWKS())
	}))
	defer srv.Close()

	clock := now
	cache := filepath.Join(t.TempDir(), "jwks-cache.json")
	hk := &idtoken.HTTPKeys{URL: idtoken.ServerKeysURL(srv.URL + "/"), Client: srv.Client(), CacheFile: cache, TTL: time.Hour,
		Now: func() time.Time { return clock }}
	assert.Equal(t, srv.URL+"/oauth/discovery/keys", hk.URL)
	v := &idtoken.Verifier{Issuer: server, Audience: server, Variable: "SITE_ID_TOKEN", Keys: hk, Now: func() time.Time { return clock }}
	raw := iss.Mint(t, iss.Claims("alice", jobID, server, now))
	ctx := context.Background()

	_, err := v.Verify(ctx, raw, jobID)
	require.NoError(t, err)
	assert.EqualValues(t, 1, hits.Load())
	_, err = v.Verify(ctx, raw, jobID)
	require.NoError(t, err)
	assert.EqualValues(t, 1, hits.Load(), "served from the cache within the TTL")

	// Another process (a later stage) uses the same cache file.
	hk2 := *hk
	_, err = hk2.Keys(ctx, false)
	require.NoError(t, err)
	assert.EqualValues(t, 1, hits.Load())

	clock = clock.Add(time.Hour)
	_, err = v.Verify(ctx, raw, jobID)
	require.NoError(t, err)
	assert.EqualValues(t, 2, hits.Load(), "fetched again after the TTL")

	// GitLab down with a stale cache: a system failure, not stale keys.
	clock = clock.Add(2 * time.Hour)
	fail.Store(true)
	_, err = v.Verify(ctx, raw, jobID)
	refused(t, err, idtoken.JWKSUnavailable, "503 Service Unavailable", srv.URL+"/oauth/discovery/keys")
	assert.Equal(t, failure.System, failure.ClassOf(err))

	// A client without the test CA (the system CAs) does not trust the server.
	plain := &idtoken.HTTPKeys{URL: hk.URL, TTL: time.Hour}
	_, err = plain.Keys(ctx, false)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "certificate")
}

func TestJWKSWithPrivateKeyRefused(t *testing.T) {
	iss := idtokentest.New(t, server)
	doc, err := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: iss.RSA, KeyID: "k"}}})
	require.NoError(t, err)
	p := filepath.Join(t.TempDir(), "jwks.json")
	require.NoError(t, os.WriteFile(p, doc, 0o644))
	_, err = idtoken.FileKeys{Path: p}.Keys(context.Background(), false)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "private key")
}
