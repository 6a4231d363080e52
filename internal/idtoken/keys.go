package idtoken

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/ci-exec/ci-exec/internal/atomicfile"
)

// maxJWKS bounds a JWKS document: GitLab's has a handful of keys.
const maxJWKS = 1 << 20

// KeysPath is where GitLab publishes its ID token signing keys.
const KeysPath = "/oauth/discovery/keys"

// FileKeys reads a JWKS from a file the admin maintains (`[auth]
// jwks_file`: offline sites, tests). It is read on every call, so a
// replaced file takes effect at once.
type FileKeys struct{ Path string }

func (f FileKeys) String() string { return "file " + f.Path }

// Keys reads and parses the file.
func (f FileKeys) Keys(context.Context, bool) (*jose.JSONWebKeySet, error) {
	b, err := os.ReadFile(f.Path)
	if err != nil {
		return nil, err
	}
	return parseJWKS(b)
}

func parseJWKS(b []byte) (*jose.JSONWebKeySet, error) {
	var ks jose.JSONWebKeySet
	if err := json.Unmarshal(b, &ks); err != nil {
		return nil, fmt.Errorf("not a JWKS document: %v", err)
	}
	if len(ks.Keys) == 0 {
		return nil, fmt.Errorf("the JWKS has no keys")
	}
	for _, k := range ks.Keys {
		if !k.IsPublic() {
			// A private key in a world-readable cache or a shared file is
			// an admin mistake worth stopping for.
			return nil, fmt.Errorf("the JWKS holds a private key (kid %q); publish only public keys", k.KeyID)
		}
	}
	return &ks, nil
}

// HTTPKeys fetches GitLab's JWKS from <server>/oauth/discovery/keys and
// caches it in CacheFile for TTL, so that not every stage of every job
// asks GitLab. The cache records where and when it was fetched; a cache
// from another URL or older than TTL is fetched again. When a fetch fails
// a stale cache is not used: a key GitLab withdrew must stop verifying.
type HTTPKeys struct {
	// URL is the JWKS address (ServerKeysURL of the trusted gitlab_server).
	URL string
	// Client defaults to an http.Client with the system CAs and a timeout.
	Client *http.Client
	// CacheFile, when set, keeps the last good JWKS (root-owned dir).
	CacheFile string
	TTL       time.Duration
	Now       func() time.Time
}

// ServerKeysURL is the JWKS address of a GitLab server.
func ServerKeysURL(server string) string { return normalise(server) + KeysPath }

func (h *HTTPKeys) String() string { return h.URL }

type cached struct {
	URL     string          `json:"url"`
	Fetched time.Time       `json:"fetched"`
	JWKS    json.RawMessage `json:"jwks"`
}

func (h *HTTPKeys) now() time.Time {
	if h.Now != nil {
		return h.Now()
	}
	return time.Now()
}

// Keys returns the cached JWKS while fresh, else fetches it.
func (h *HTTPKeys) Keys(ctx context.Context, refresh bool) (*jose.JSONWebKeySet, error) {
	if !refresh && h.CacheFile != "" {
		if ks := h.fromCache(); ks != nil {
			return ks, nil
		}
	}
	b, err := h.fetch(ctx)
	if err != nil {
		return nil, err
	}
	ks, err := parseJWKS(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", h.URL, err)
	}
	if h.CacheFile != "" {
		doc, err := json.Marshal(cached{URL: h.URL, Fetched: h.now(), JWKS: b})
		if err == nil {
			// The keys are public; a failed cache write costs only a fetch.
			_ = atomicfile.Write(h.CacheFile, doc, 0o644)
		}
	}
	return ks, nil
}

func (h *HTTPKeys) fromCache() *jose.JSONWebKeySet {
	b, err := os.ReadFile(h.CacheFile)
	if err != nil {
		return nil
	}
	var c cached
	if json.Unmarshal(b, &c) != nil || c.URL != h.URL {
		return nil
	}
	if age := h.now().Sub(c.Fetched); age < 0 || age >= h.TTL {
		return nil
	}
	ks, err := parseJWKS(c.JWKS)
	if err != nil {
		return nil
	}
	return ks
}

func (h *HTTPKeys) fetch(ctx context.Context) ([]byte, error) {
	c := h.Client
	if c == nil {
		c = &http.Client{Timeout: 20 * time.Second, CheckRedirect: httpsOnly}
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, h.URL, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := c.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", h.URL, resp.Status)
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxJWKS+1))
	if err != nil {
		return nil, fmt.Errorf("GET %s: %v", h.URL, err)
	}
	if len(b) > maxJWKS {
		return nil, fmt.Errorf("GET %s: more than %d bytes", h.URL, maxJWKS)
	}
	return b, nil
}

// httpsOnly refuses a redirect that would fetch the keys in the clear.
func httpsOnly(req *http.Request, via []*http.Request) error {
	if req.URL.Scheme != "https" && req.URL.Scheme != via[0].URL.Scheme {
		return fmt.Errorf("refusing redirect to %s: the keys must come over https", req.URL.Redacted())
	}
	if len(via) >= 5 {
		return fmt.Errorf("too many redirects")
	}
	return nil
}
