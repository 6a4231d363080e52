package mechtest

import (
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/ci-exec/ci-exec/internal/policy"
	"github.com/stretchr/testify/require"
)

// Digests the fake registry serves.
var (
	Digest1 = "sha256:" + strings.Repeat("1", 64)
	Digest2 = "sha256:" + strings.Repeat("2", 64)
)

// TinyTag is the tag of the test image, which the fake registry points at
// Digest1 when it starts.
const TinyTag = "ci/tiny:latest"

// Scheme is how the fake registry is reached.
type Scheme int

const (
	// PlainHTTP is an insecure registry as Apptainer reaches it (--no-https,
	// registry.Options{PlainHTTP: true}).
	PlainHTTP Scheme = iota
	// SelfSignedTLS is HTTPS with a self-signed certificate, so only a
	// registry listed as insecure, whose certificate is not checked
	// (registry.Options{SkipVerify: true}), can be reached: Charliecloud's.
	SelfSignedTLS
)

// Registry answers the manifest HEAD requests of tag resolution, optionally
// behind basic authentication.
type Registry struct {
	// Host is the registry's host:port on the loopback interface.
	Host string

	mu         sync.Mutex
	tags       map[string]string // "ci/tiny:latest" -> digest
	user, pass string
	heads      int
}

// quietLog drops the server's "TLS handshake error" lines.
var quietLog = log.New(io.Discard, "", 0)

// StartRegistry starts a fake registry, stopped when the test ends, with
// TinyTag at Digest1.
func StartRegistry(t *testing.T, scheme Scheme) *Registry {
	t.Helper()
	g := &Registry{tags: map[string]string{TinyTag: Digest1}}
	srv := httptest.NewUnstartedServer(g)
	if scheme == SelfSignedTLS {
		srv.Config.ErrorLog = quietLog
		srv.StartTLS()
	} else {
		srv.Start()
	}
	t.Cleanup(srv.Close)
	g.Host = srv.Listener.Addr().String()
	return g
}

func (g *Registry) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.user != "" {
		if u, p, ok := r.BasicAuth(); !ok || u != g.user || p != g.pass {
			w.Header().Set("WWW-Authenticate", `Basic realm="fake"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
	}
	if r.URL.Path == "/v2/" {
		return
	}
	repo, tag, ok := strings.Cut(strings.TrimPrefix(r.URL.Path, "/v2/"), "/manifests/")
	if !ok || r.Method != http.MethodHead {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	g.heads++
	d, found := g.tags[repo+":"+tag]
	if !found {
		w.WriteHeader(http.StatusNotFound)
		return
	}
	w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
	w.Header().Set("Content-Length", "321")
	w.Header().Set("Docker-Content-Digest", d)
	w.WriteHeader(http.StatusOK)
}

// Set points a tag ("ci/tiny:latest") at a digest.
func (g *Registry) Set(tag, digest string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.tags[tag] = digest
}

// RequireLogin makes every request need these basic credentials.
func (g *Registry) RequireLogin(user, pass string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.user, g.pass = user, pass
}

// Resolved is how many manifest HEAD requests arrived.
func (g *Registry) Resolved() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.heads
}

// Ref is the tiny test image (TinyTag) on this registry.
func (g *Registry) Ref(t *testing.T) policy.Ref { return ParsedRef(t, g.Host+"/"+TinyTag) }

// ClosedPort is a loopback address nothing listens on.
func ClosedPort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	require.NoError(t, l.Close())
	return addr
}

// ParsedRef is a validated reference, as Prepare hands it to Pull.
func ParsedRef(t *testing.T, s string) policy.Ref {
	t.Helper()
	ref, err := policy.ParseImage(s)
	require.NoError(t, err)
	return ref
}
