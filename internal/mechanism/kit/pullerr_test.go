package kit

import (
	"errors"
	"net"
	"net/http"
	"net/url"
	"os"
	"syscall"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/stretchr/testify/assert"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/failure"
)

var testNames = auth.VariableNames{Username: "CH_IMAGE_USERNAME", Password: "CH_IMAGE_PASSWORD"}

// TestDigestError: a failed tag resolution gets its class from the
// error's type, and a registry that is down is named as such.
func TestDigestError(t *testing.T) {
	addr, _ := net.ResolveTCPAddr("tcp", "127.0.0.1:5999")
	refused := &url.Error{Op: "Get", URL: "https://127.0.0.1:5999/v2/", Err: &net.OpError{Op: "dial", Net: "tcp", Addr: addr, Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}}
	// What the library reports for a loopback registry: the https://
	// attempt, then the refused plain-HTTP fallback.
	fallback := &url.Error{Op: "Get", URL: "http://127.0.0.1:5999/v2/", Err: errors.New("plain HTTP refused: the registry is not in insecure_registries")}
	tests := map[string]struct {
		err   error
		ref   string
		class failure.Class
		want  string
	}{
		"registry down": {err: errors.Join(refused, fallback), ref: "127.0.0.1:5999/ci/tiny:latest", class: failure.System,
			want: "pulling 127.0.0.1:5999/ci/tiny:latest: connection refused by 127.0.0.1:5999: is the registry up? (a system failure: the runner will retry)"},
		"missing tag": {err: &transport.Error{StatusCode: http.StatusNotFound}, ref: "127.0.0.1:5443/ci/tiny:no-such-tag", class: failure.User,
			want: `pulling 127.0.0.1:5443/ci/tiny:no-such-tag: image not found, or access denied (tag "no-such-tag" of 127.0.0.1:5443/ci/tiny; check the image name and tag, or, if the registry needs a login, set CH_IMAGE_USERNAME and CH_IMAGE_PASSWORD as CI/CD variables)`},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			err := DigestError(tt.err, tt.ref, auth.Credential{}, testNames)
			assert.Equal(t, tt.class, failure.ClassOf(err))
			assert.Equal(t, tt.want, err.Error())
		})
	}
}

func TestPullErrorNames(t *testing.T) {
	for ref, want := range map[string]string{
		"127.0.0.1:5443/ci/tiny:v2":         `tag "v2" of 127.0.0.1:5443/ci/tiny`,
		"docker.io/library/alpine":          `tag "latest" of docker.io/library/alpine`,
		"reg.example.org/a/b@sha256:" + sha: "digest sha256:" + sha + " of reg.example.org/a/b",
	} {
		assert.Equal(t, want, whatWasAsked(ref), ref)
	}
	for ref, want := range map[string]string{
		"127.0.0.1:5443/ci/tiny:v2":    "127.0.0.1:5443",
		"reg.example.org/a/b:1":        "reg.example.org:443",
		"[::1]:5000/x:1":               "[::1]:5000",
		"docker.io/library/alpine:3.2": "docker.io:443",
	} {
		assert.Equal(t, want, registryAddr(ref), ref)
	}
	err := PullError(PullRefused, "reg.example.org/a/b:1", auth.Credential{}, testNames, "", "")
	assert.Equal(t, "pulling reg.example.org/a/b:1: connection refused by reg.example.org:443: is the registry up? (a system failure: the runner will retry)", err.Error())
	assert.Equal(t, failure.System, failure.ClassOf(err))
}

const sha = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
