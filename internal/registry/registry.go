// Package registry asks an image registry for the manifest digest a tag
// points to, with google/go-containerregistry, under the same credential
// rules as the runtimes' pulls (the credential travels only inside this
// process). Knowing the digest before pulling lets a runtime pull exactly
// that manifest and reuse what it already has for it.
package registry

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"syscall"
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
// It says what ci-exec refused, not what the server did: it is also the
// answer to the library's http:// fallback after a failed https://
// attempt, when no server may be there at all.
var errPlainHTTP = errors.New("plain HTTP refused: the registry is not in insecure_registries")

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
	// AuthRefused: the registry answered 401 or 403.
	AuthRefused
	// NotFound: the registry answered 404 for the manifest (no such tag or
	// repository).
	NotFound
	// TLS: the registry's certificate is not trusted here.
	TLS
	// PlainHTTP: the registry speaks plain HTTP, which is not allowed.
	PlainHTTP
	// Refused: the registry's host refused the connection (nothing listens
	// on that port: the registry is down).
	Refused
	// Unreachable: unknown host, no route, timeout.
	Unreachable
)

// Diagnosis is why Digest failed.
type Diagnosis struct {
	Failure Failure
	// Addr is the host:port that refused the connection or could not be
	// reached ("" when not known).
	Addr string
	// Detail is the deciding error's own message: for loopback and
	// private addresses the library tries https:// and then http://, and
	// only the https:// attempt says what went wrong (httpsOnly refuses
	// the other).
	Detail string
}

// Classify tells why Digest failed.
func Classify(err error) Failure { return Diagnose(err).Failure }

// Diagnose tells why Digest failed, from the errors' types and values
// (errors.As, errors.Is), never from their text. The checks go from the
// most to the least telling: an HTTP status, then TLS and network errors
// (the https:// attempt's), and plain HTTP last, because the library's
// http:// fallback after a failed https:// attempt is refused by httpsOnly
// whatever the cause was.
func Diagnose(err error) Diagnosis {
	d := Diagnosis{Failure: Other, Detail: err.Error()}
	var te *transport.Error
	if errors.As(err, &te) {
		switch te.StatusCode {
		case http.StatusUnauthorized, http.StatusForbidden:
			d.Failure = AuthRefused
			return d
		case http.StatusNotFound:
			d.Failure = NotFound
			return d
		}
	}
	if e := tlsError(err); e != nil {
		d.Failure, d.Detail = TLS, e.Error()
		return d
	}
	var op *net.OpError
	hasOp := errors.As(err, &op)
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		d.Failure = Refused
	case errors.As(err, new(*net.DNSError)),
		errors.Is(err, syscall.ENETUNREACH), errors.Is(err, syscall.EHOSTUNREACH),
		errors.Is(err, syscall.ETIMEDOUT), errors.Is(err, context.DeadlineExceeded),
		isTimeout(err), hasOp && op.Op == "dial":
		d.Failure = Unreachable
	case errors.Is(err, errPlainHTTP), errors.Is(err, http.ErrSchemeMismatch):
		d.Failure = PlainHTTP
		return d
	default:
		return d
	}
	d.Addr = address(err, op)
	var dns *net.DNSError
	var ue *url.Error
	switch {
	case errors.As(err, &dns):
		d.Detail = dns.Error()
	case hasOp:
		d.Detail = op.Error()
	case errors.As(err, &ue):
		d.Detail = ue.Error()
	}
	return d
}

// tlsError is the certificate check's error in err, if any.
func tlsError(err error) error {
	var verify *tls.CertificateVerificationError
	var unknown x509.UnknownAuthorityError
	var invalid x509.CertificateInvalidError
	var host x509.HostnameError
	var roots x509.SystemRootsError
	switch {
	case errors.As(err, &verify):
		return verify
	case errors.As(err, &unknown):
		return unknown
	case errors.As(err, &invalid):
		return invalid
	case errors.As(err, &host):
		return host
	case errors.As(err, &roots):
		return roots
	}
	return nil
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// address is the host:port the failed request went to, as the reference
// names it (the URL's host, with the scheme's port when it has none), or
// else the address that was dialled.
func address(err error, op *net.OpError) string {
	var ue *url.Error
	if errors.As(err, &ue) {
		if u, perr := url.Parse(ue.URL); perr == nil && u.Host != "" {
			if u.Port() != "" {
				return u.Host
			}
			port := "443"
			if u.Scheme == "http" {
				port = "80"
			}
			return net.JoinHostPort(u.Hostname(), port)
		}
	}
	if op != nil && op.Addr != nil {
		return op.Addr.String()
	}
	return ""
}
