package registry

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	ggcrregistry "github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/job"
)

const (
	testUser = "alice"
	testPass = "s3cret-Passw0rd"
	jobToken = "glcbt-test-job-token"
)

var names = auth.VariableNames{Username: "CH_IMAGE_USERNAME", Password: "CH_IMAGE_PASSWORD"}

// recorder counts the requests that reached a handler and the Authorization
// headers they carried.
type recorder struct {
	mu       sync.Mutex
	requests int
	authz    []string
}

func (r *recorder) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		r.mu.Lock()
		r.requests++
		if a := req.Header.Get("Authorization"); a != "" {
			r.authz = append(r.authz, a)
		}
		r.mu.Unlock()
		next.ServeHTTP(w, req)
	})
}

func (r *recorder) snapshot() (int, []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.requests, append([]string(nil), r.authz...)
}

// basicAuth requires one of the given user/password pairs on every request.
func basicAuth(next http.Handler, pairs map[string]string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		u, p, ok := req.BasicAuth()
		if want, known := pairs[u]; !ok || !known || want != p {
			w.Header().Set("WWW-Authenticate", `Basic realm="x"`)
			http.Error(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`, http.StatusUnauthorized)
			return
		}
		next.ServeHTTP(w, req)
	})
}

func quietRegistry() http.Handler {
	return ggcrregistry.New(ggcrregistry.Logger(log.New(io.Discard, "", 0)))
}

// push writes a small random image to host/repo:tag through the given
// transport, with basic auth when user is not empty, and returns its digest.
func push(t *testing.T, host, repo string, tr http.RoundTripper, plain bool, user, pass string) v1.Hash {
	t.Helper()
	var opts []name.Option
	if plain {
		opts = append(opts, name.Insecure)
	}
	ref, err := name.ParseReference(host+"/"+repo, opts...)
	require.NoError(t, err)
	img, err := random.Image(512, 1)
	require.NoError(t, err)
	ropts := []remote.Option{remote.WithTransport(tr)}
	if user != "" {
		ropts = append(ropts, remote.WithAuth(authn.FromConfig(authn.AuthConfig{Username: user, Password: pass})))
	}
	require.NoError(t, remote.Write(ref, img, ropts...))
	d, err := img.Digest()
	require.NoError(t, err)
	return d
}

func hostOf(srv *httptest.Server) string {
	return strings.TrimPrefix(strings.TrimPrefix(srv.URL, "https://"), "http://")
}

// userCred is a credential from the user's own CI/CD variables.
func userCred(t *testing.T, host, user, pass string) auth.Credential {
	t.Helper()
	j := &job.Job{Vars: map[string]string{names.Username: user, names.Password: pass}}
	c, err := auth.Choose(j, host, names)
	require.NoError(t, err)
	require.Equal(t, auth.UserVariables, c.Source)
	return c
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

func TestDigestTLSAnonymous(t *testing.T) {
	srv := newServer(t, "127.0.0.1", quietRegistry(), false)
	host := hostOf(srv)
	want := push(t, host, "group/app:v1", srv.Client().Transport, false, "", "")

	got, err := Digest(ctx(t), host+"/group/app:v1", auth.Credential{}, Options{SkipVerify: true})
	require.NoError(t, err)
	assert.Equal(t, want.String(), got)
	assert.True(t, strings.HasPrefix(got, "sha256:"), got)

	t.Run("another tag of another image differs", func(t *testing.T) {
		other := push(t, host, "group/app:v2", srv.Client().Transport, false, "", "")
		require.NotEqual(t, want, other)
		got, err := Digest(ctx(t), host+"/group/app:v2", auth.Credential{}, Options{SkipVerify: true})
		require.NoError(t, err)
		assert.Equal(t, other.String(), got)
	})

	t.Run("missing tag is NotFound", func(t *testing.T) {
		_, err := Digest(ctx(t), host+"/group/app:nope", auth.Credential{}, Options{SkipVerify: true})
		require.Error(t, err)
		assert.Equal(t, NotFound, Classify(err), "%v", err)
	})

	t.Run("missing repository is NotFound", func(t *testing.T) {
		_, err := Digest(ctx(t), host+"/group/nothing:v1", auth.Credential{}, Options{SkipVerify: true})
		require.Error(t, err)
		assert.Equal(t, NotFound, Classify(err), "%v", err)
	})
}

func TestDigestReferenceNeedsNoRequest(t *testing.T) {
	var rec recorder
	srv := httptest.NewTLSServer(rec.wrap(quietRegistry()))
	defer srv.Close()
	const d = "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"

	for _, ref := range []string{hostOf(srv) + "/group/app@" + d, hostOf(srv) + "/group/app:v1@" + d} {
		got, err := Digest(ctx(t), ref, userCred(t, hostOf(srv), testUser, testPass), Options{})
		require.NoError(t, err, ref)
		assert.Equal(t, d, got, ref)
	}
	n, authz := rec.snapshot()
	assert.Zero(t, n, "a digest reference must not cause a request")
	assert.Empty(t, authz)
}

func TestDigestBadReference(t *testing.T) {
	for _, ref := range []string{"", "UPPER/case:tag", "host/repo:bad tag", "host/repo@sha256:short"} {
		_, err := Digest(ctx(t), ref, auth.Credential{}, Options{})
		assert.Error(t, err, "%q", ref)
	}
}

func TestDigestBasicAuth(t *testing.T) {
	var rec recorder
	srv := newServer(t, "127.0.0.1", rec.wrap(basicAuth(quietRegistry(), map[string]string{
		testUser: testPass, auth.JobTokenUser: jobToken,
	})), false)
	host := hostOf(srv)
	want := push(t, host, "private/app:v1", srv.Client().Transport, false, testUser, testPass)

	jobTokenJob := &job.Job{Vars: map[string]string{}, Response: &job.Response{Token: jobToken}}
	jobTokenJob.Response.Variables = []job.Variable{{Key: "CI_REGISTRY", Value: host, Public: true}}
	tokenCred, err := auth.Choose(jobTokenJob, host, names)
	require.NoError(t, err)
	require.Equal(t, auth.JobToken, tokenCred.Source)

	tests := map[string]struct {
		cred    auth.Credential
		ref     string
		want    string
		failure Failure
	}{
		"user variables":          {cred: userCred(t, host, testUser, testPass), ref: "private/app:v1", want: want.String()},
		"job token":               {cred: tokenCred, ref: "private/app:v1", want: want.String()},
		"wrong password":          {cred: userCred(t, host, testUser, "wrong"), ref: "private/app:v1", failure: AuthRefused},
		"unknown user":            {cred: userCred(t, host, "mallory", testPass), ref: "private/app:v1", failure: AuthRefused},
		"anonymous":               {cred: auth.Credential{}, ref: "private/app:v1", failure: AuthRefused},
		"right user, no such tag": {cred: userCred(t, host, testUser, testPass), ref: "private/app:v9", failure: NotFound},
	}
	for nm, tc := range tests {
		t.Run(nm, func(t *testing.T) {
			got, err := Digest(ctx(t), host+"/"+tc.ref, tc.cred, Options{SkipVerify: true})
			if tc.want != "" {
				require.NoError(t, err)
				assert.Equal(t, tc.want, got)
				return
			}
			require.Error(t, err)
			assert.Empty(t, got)
			assert.Equal(t, tc.failure, Classify(err), "%v", err)
		})
	}
	_, authz := rec.snapshot()
	assert.NotEmpty(t, authz, "the credential must have been sent to the TLS server")
}

func TestDigestPlainHTTP(t *testing.T) {
	var rec recorder
	srv := newServer(t, "127.0.0.1", rec.wrap(basicAuth(quietRegistry(), map[string]string{testUser: testPass})), true)
	host := hostOf(srv)
	want := push(t, host, "private/app:v1", http.DefaultTransport, true, testUser, testPass)
	n0, authz0 := rec.snapshot()
	cred := userCred(t, host, testUser, testPass)

	t.Run("refused without PlainHTTP; the credential never reaches the server", func(t *testing.T) {
		for _, o := range []Options{{}, {SkipVerify: true}} {
			got, err := Digest(ctx(t), host+"/private/app:v1", cred, o)
			require.Error(t, err)
			assert.Empty(t, got)
			assert.Equal(t, PlainHTTP, Classify(err), "%v", err)
		}
		n, authz := rec.snapshot()
		assert.Equal(t, n0, n, "no HTTP request may reach the plain server")
		assert.Equal(t, authz0, authz, "no Authorization header may reach the plain server")
	})

	t.Run("refused on an address without the library's fallback too", func(t *testing.T) {
		var rec2 recorder
		srv2 := newServer(t, "127.0.0.2", rec2.wrap(basicAuth(quietRegistry(), map[string]string{testUser: testPass})), true)
		host2 := hostOf(srv2)
		_, err := Digest(ctx(t), host2+"/private/app:v1", userCred(t, host2, testUser, testPass), Options{})
		require.Error(t, err)
		assert.Equal(t, PlainHTTP, Classify(err), "%v", err)
		n, authz := rec2.snapshot()
		assert.Zero(t, n)
		assert.Empty(t, authz)
	})

	t.Run("allowed with PlainHTTP", func(t *testing.T) {
		got, err := Digest(ctx(t), host+"/private/app:v1", cred, Options{PlainHTTP: true})
		require.NoError(t, err)
		assert.Equal(t, want.String(), got)
		_, authz := rec.snapshot()
		assert.Greater(t, len(authz), len(authz0), "the credential is sent when plain HTTP is allowed")
	})

	t.Run("PlainHTTP with a wrong password is AuthRefused", func(t *testing.T) {
		_, err := Digest(ctx(t), host+"/private/app:v1", userCred(t, host, testUser, "nope"), Options{PlainHTTP: true})
		require.Error(t, err)
		assert.Equal(t, AuthRefused, Classify(err), "%v", err)
	})
}

// quietLog drops the servers' "TLS handshake error" lines.
var quietLog = log.New(io.Discard, "", 0)

// newServer starts h on ip (TLS unless plain). Only 127.0.0.1, localhost,
// *.localhost, ::1 and RFC 1918 addresses get go-containerregistry's
// plain-HTTP fallback ping; 127.0.0.2 does not.
func newServer(t *testing.T, ip string, h http.Handler, plain bool) *httptest.Server {
	t.Helper()
	l, err := net.Listen("tcp", ip+":0")
	if err != nil {
		t.Fatalf("cannot listen on %s: %v", ip, err)
	}
	srv := httptest.NewUnstartedServer(h)
	srv.Listener.Close()
	srv.Listener = l
	srv.Config.ErrorLog = quietLog
	if plain {
		srv.Start()
	} else {
		srv.StartTLS()
	}
	t.Cleanup(srv.Close)
	return srv
}

// insecureTransport trusts any certificate (the test certificate does not
// name 127.0.0.2).
func insecureTransport() http.RoundTripper {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.TLSClientConfig = &tls.Config{InsecureSkipVerify: true} //nolint:gosec // test server
	return t
}

func TestDigestUntrustedTLS(t *testing.T) {
	t.Run("127.0.0.2 (no plain-HTTP fallback)", func(t *testing.T) {
		var rec recorder
		srv := newServer(t, "127.0.0.2", rec.wrap(quietRegistry()), false)
		host := hostOf(srv)
		want := push(t, host, "app:v1", insecureTransport(), false, "", "")
		n0, _ := rec.snapshot()

		_, err := Digest(ctx(t), host+"/app:v1", userCred(t, host, testUser, testPass), Options{})
		require.Error(t, err)
		assert.Equal(t, TLS, Classify(err), "%v", err)
		n, _ := rec.snapshot()
		assert.Equal(t, n0, n, "nothing may reach the handler when the certificate is not trusted")

		got, err := Digest(ctx(t), host+"/app:v1", auth.Credential{}, Options{SkipVerify: true})
		require.NoError(t, err)
		assert.Equal(t, want.String(), got)
	})

	t.Run("127.0.0.1 (library tries plain HTTP too)", func(t *testing.T) {
		var rec recorder
		srv := newServer(t, "127.0.0.1", rec.wrap(quietRegistry()), false)
		host := hostOf(srv)
		push(t, host, "app:v1", srv.Client().Transport, false, "", "")
		n0, _ := rec.snapshot()

		_, err := Digest(ctx(t), host+"/app:v1", userCred(t, host, testUser, testPass), Options{})
		require.Error(t, err)
		n, _ := rec.snapshot()
		assert.Equal(t, n0, n, "nothing may reach the handler when the certificate is not trusted")
		assert.Equal(t, TLS, Classify(err), "%v", err)
	})
}

// TestDigestRefused: a registry that is down (nothing listens on its
// port) is Refused, with its address, and the reason is the https://
// attempt's, not the plain-HTTP fallback's refusal.
func TestDigestRefused(t *testing.T) {
	closedPort := func(t *testing.T, ip string) string {
		l, err := net.Listen("tcp", ip+":0")
		if err != nil {
			t.Fatalf("cannot listen on %s: %v", ip, err)
		}
		addr := l.Addr().String()
		require.NoError(t, l.Close())
		return addr
	}
	tests := map[string]struct {
		ip    string
		plain bool
	}{
		"127.0.0.2 (no plain-HTTP fallback)": {ip: "127.0.0.2"},
		"127.0.0.1 with PlainHTTP":           {ip: "127.0.0.1", plain: true},
		"127.0.0.1 without PlainHTTP":        {ip: "127.0.0.1"},
	}
	for nm, tc := range tests {
		t.Run(nm, func(t *testing.T) {
			host := closedPort(t, tc.ip)
			_, err := Digest(ctx(t), host+"/app:v1", auth.Credential{}, Options{PlainHTTP: tc.plain, Timeout: 10 * time.Second})
			require.Error(t, err)
			d := Diagnose(err)
			assert.Equal(t, Refused, d.Failure, "%v", err)
			assert.Equal(t, host, d.Addr)
			assert.Contains(t, d.Detail, "connection refused")
			assert.NotContains(t, d.Detail, "HTTP response to HTTPS client")
			assert.NotContains(t, d.Detail, "plain HTTP")
		})
	}
}

func TestDigestUnknownHost(t *testing.T) {
	_, err := Digest(ctx(t), "no-such-host.invalid:5000/app:v1", auth.Credential{}, Options{Timeout: 10 * time.Second})
	require.Error(t, err)
	d := Diagnose(err)
	assert.Equal(t, Unreachable, d.Failure, "%v", err)
	assert.Equal(t, "no-such-host.invalid:5000", d.Addr)
	assert.Contains(t, d.Detail, "no-such-host.invalid")
}

func TestDigestTimeout(t *testing.T) {
	for _, ip := range []string{"127.0.0.2", "127.0.0.1"} {
		t.Run(ip, func(t *testing.T) {
			block := make(chan struct{})
			defer close(block)
			srv := newServer(t, ip, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				select {
				case <-block:
				case <-r.Context().Done():
				}
			}), false)
			_, err := Digest(ctx(t), hostOf(srv)+"/app:v1", auth.Credential{}, Options{SkipVerify: true, Timeout: 300 * time.Millisecond})
			require.Error(t, err)
			assert.Equal(t, Unreachable, Classify(err), "%v", err)
		})
	}
}

func TestHTTPSOnly(t *testing.T) {
	var rec recorder
	srv := httptest.NewServer(rec.wrap(http.NotFoundHandler()))
	defer srv.Close()

	req, err := http.NewRequest(http.MethodGet, srv.URL+"/v2/", nil)
	require.NoError(t, err)
	req.SetBasicAuth(testUser, testPass)

	_, err = roundTripper(Options{}).RoundTrip(req)
	require.ErrorIs(t, err, errPlainHTTP)
	assert.Equal(t, PlainHTTP, Classify(err))
	n, _ := rec.snapshot()
	assert.Zero(t, n)

	resp, err := roundTripper(Options{PlainHTTP: true}).RoundTrip(req)
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusNotFound, resp.StatusCode)
	n, authz := rec.snapshot()
	assert.Equal(t, 1, n)
	assert.Len(t, authz, 1)
}

func TestClassify(t *testing.T) {
	dial := func(addr string, errno syscall.Errno) error {
		a, _ := net.ResolveTCPAddr("tcp", addr)
		return &net.OpError{Op: "dial", Net: "tcp", Addr: a, Err: os.NewSyscallError("connect", errno)}
	}
	get := func(u string, err error) error { return &url.Error{Op: "Get", URL: u, Err: err} }
	refused := get("https://127.0.0.1:5999/v2/", dial("127.0.0.1:5999", syscall.ECONNREFUSED))
	plainRefusal := get("http://127.0.0.1:5999/v2/", errPlainHTTP)
	tests := map[string]struct {
		err  error
		want Failure
		addr string
	}{
		"refused":                      {err: refused, want: Refused, addr: "127.0.0.1:5999"},
		"refused, then plain refused":  {err: errors.Join(refused, plainRefusal), want: Refused, addr: "127.0.0.1:5999"},
		"plain refused, then refused":  {err: errors.Join(plainRefusal, refused), want: Refused, addr: "127.0.0.1:5999"},
		"refused, no port in the URL":  {err: get("https://reg.example.org/v2/", dial("10.0.0.5:443", syscall.ECONNREFUSED)), want: Refused, addr: "reg.example.org:443"},
		"refused, no URL":              {err: dial("10.0.0.5:443", syscall.ECONNREFUSED), want: Refused, addr: "10.0.0.5:443"},
		"no route":                     {err: get("https://10.9.9.9:5000/v2/", dial("10.9.9.9:5000", syscall.EHOSTUNREACH)), want: Unreachable, addr: "10.9.9.9:5000"},
		"network unreachable":          {err: get("https://10.9.9.9:5000/v2/", dial("10.9.9.9:5000", syscall.ENETUNREACH)), want: Unreachable, addr: "10.9.9.9:5000"},
		"dns":                          {err: get("https://nope.invalid/v2/", &net.OpError{Op: "dial", Net: "tcp", Err: &net.DNSError{Err: "no such host", Name: "nope.invalid", IsNotFound: true}}), want: Unreachable, addr: "nope.invalid:443"},
		"deadline":                     {err: get("http://h:80/v2/", context.DeadlineExceeded), want: Unreachable, addr: "h:80"},
		"x509":                         {err: get("https://h/v2/", &tls.CertificateVerificationError{Err: x509.UnknownAuthorityError{}}), want: TLS},
		"x509 with a plain refusal":    {err: errors.Join(get("https://h/v2/", x509.HostnameError{Certificate: &x509.Certificate{}, Host: "h"}), plainRefusal), want: TLS},
		"plain refused":                {err: plainRefusal, want: PlainHTTP},
		"scheme mismatch":              {err: get("https://h/v2/", http.ErrSchemeMismatch), want: PlainHTTP},
		"not found":                    {err: &transport.Error{StatusCode: http.StatusNotFound}, want: NotFound},
		"unauthorized":                 {err: &transport.Error{StatusCode: http.StatusUnauthorized}, want: AuthRefused},
		"something else":               {err: errors.New("unexpected EOF"), want: Other},
		"a message is not a type":      {err: errors.New("dial tcp 127.0.0.1:1: connect: connection refused"), want: Other},
		"a message is not a type, TLS": {err: errors.New("x509: certificate signed by unknown authority"), want: Other},
	}
	for nm, tc := range tests {
		t.Run(nm, func(t *testing.T) {
			d := Diagnose(tc.err)
			assert.Equal(t, tc.want, d.Failure)
			assert.Equal(t, tc.addr, d.Addr)
			if tc.want != PlainHTTP {
				assert.NotContains(t, d.Detail, "plain HTTP refused", "the fallback's refusal is not the reason")
			}
		})
	}
}
