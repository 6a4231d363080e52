// Package registry asks an image registry for the manifest digest a tag
// points to, with google/go-containerregistry, under the same credential
// rules as the runtimes' pulls (the credential travels only inside this
// process). Knowing the digest before pulling lets a runtime pull exactly
// that manifest and reuse what it already has for it.
package registry

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"

	"github.com/ci-exec/ci-exec/internal/auth"
)

// Options are how one registry may be reached.
type Options struct {
	// PlainHTTP allows http:// (the admin's insecure_registries for a
	// runtime that pulls over plain HTTP).
	PlainHTTP bool
	// SkipVerify skips TLS verification (insecure_registries for a runtime
	// that pulls with TLS verification off).
	SkipVerify bool
	// Timeout bounds the whole request (default 60s).
	Timeout time.Duration
}

// Digest returns the manifest digest ("sha256:...") that ref (a normalised
// reference, registry/path:tag or @digest) points to.
func Digest(ctx context.Context, ref string, cred auth.Credential, o Options) (string, error) {
	var nopts []name.Option
	if o.PlainHTTP {
		nopts = append(nopts, name.Insecure)
	}
	r, err := name.ParseReference(ref, append(nopts, name.StrictValidation)...)
	if err != nil {
		return "", fmt.Errorf("parse %s: %w", ref, err)
	}
	if d, ok := r.(name.Digest); ok {
		return d.DigestStr(), nil
	}
	if o.Timeout == 0 {
		o.Timeout = 60 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	var a authn.Authenticator = authn.Anonymous
	if !cred.Anonymous() {
		a = authn.FromConfig(authn.AuthConfig{Username: cred.Username, Password: cred.Password()})
	}
	desc, err := remote.Head(r, remote.WithAuth(a), remote.WithContext(ctx), remote.WithTransport(roundTripper(o)))
	if err != nil {
		return "", err
	}
	return desc.Digest.String(), nil
}

// LoadTrust starts loading the system's CA certificates in the background,
// so that the first Digest does not wait for all of it.
func LoadTrust() {
	go systemTrust()
}

// roundTripper is the default transport (proxies from the environment, the
// system trust store) that refuses plain HTTP unless allowed: the library
// falls back to http:// for loopback and private-network registries, which
// would send credentials in clear to a registry the admin never listed.
func roundTripper(o Options) http.RoundTripper {
	t := remote.DefaultTransport.(*http.Transport).Clone()
	if o.SkipVerify {
		t.TLSClientConfig = &tls.Config{InsecureSkipVerify: true} //nolint:gosec // the admin listed this registry
	} else if pool := systemTrust(); pool != nil {
		t.TLSClientConfig = &tls.Config{RootCAs: pool}
	}
	if o.PlainHTTP {
		return t
	}
	return httpsOnly{t}
}

type httpsOnly struct{ next http.RoundTripper }

// errPlainHTTP is returned for a plain-HTTP request that is not allowed.
var errPlainHTTP = errors.New("server gave HTTP response to HTTPS client (plain HTTP is not allowed for this registry)")

func (h httpsOnly) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Scheme != "https" {
		return nil, errPlainHTTP
	}
	return h.next.RoundTrip(req)
}

// Failure is what a failed Digest came down to.
type Failure int

const (
	Other Failure = iota
	AuthRefused
	NotFound
	TLS
	PlainHTTP
	Unreachable
)

// Classify tells why Digest failed.
func Classify(err error) Failure {
	var te *transport.Error
	if errors.As(err, &te) {
		switch te.StatusCode {
		case http.StatusUnauthorized, http.StatusForbidden:
			return AuthRefused
		case http.StatusNotFound:
			return NotFound
		}
	}
	// For loopback and private addresses the library tries https:// and
	// http:// and reports both failures together; the https one decides
	// (httpsOnly's refusal of the http:// attempt says nothing), so TLS and
	// network failures are checked first: a real plain-HTTP registry's
	// https error mentions neither.
	msg := err.Error()
	switch {
	case strings.Contains(msg, "x509:") || strings.Contains(msg, "tls:"):
		return TLS
	case strings.Contains(msg, "connection refused") || strings.Contains(msg, "no such host") ||
		strings.Contains(msg, "i/o timeout") || strings.Contains(msg, "context deadline exceeded") ||
		strings.Contains(msg, "network is unreachable"):
		return Unreachable
	case errors.Is(err, errPlainHTTP) || strings.Contains(msg, "server gave HTTP response to HTTPS client"):
		return PlainHTTP
	}
	return Other
}
