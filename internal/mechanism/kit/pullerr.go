package kit

import (
	"context"
	"errors"
	"fmt"
	"net"
	"regexp"
	"strings"
	"sync"

	"github.com/distribution/reference"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/imagecache"
	"github.com/ci-exec/ci-exec/internal/joblog"
	"github.com/ci-exec/ci-exec/internal/registry"
)

// PullFailure is what a failed pull came down to, as read from the runtime's
// output. Runtimes only recognise their own messages; the exit class and the
// advice in the job log are the same for every runtime.
type PullFailure int

const (
	// PullOther is anything not recognised: a system failure.
	PullOther PullFailure = iota
	// PullAuthRefused: the registry refused the credentials sent.
	PullAuthRefused
	// PullNotFound: unauthorized or not found (some runtimes cannot tell
	// the two apart).
	PullNotFound
	// PullTLS: the registry's certificate is not trusted here.
	PullTLS
	// PullPlainHTTP: the registry speaks plain HTTP.
	PullPlainHTTP
	// PullRefused: the registry's host refused the connection (nothing
	// listens there: the registry is down).
	PullRefused
	// PullUnreachable: unknown host, no route, timeout.
	PullUnreachable
	// PullStorage: the runtime's local storage is broken.
	PullStorage
)

// PullError turns a failed pull into an error of the right class with one
// line of advice (docs/charliecloud.md, "Exit classes"):
//   - credentials the user supplied were refused, or the image is missing or
//     not readable: a user error, theirs to fix;
//   - the job token was refused: a system error (GitLab's token, not the
//     user's input, is at fault; the runner retries);
//   - TLS, plain HTTP, network, storage and anything else: a system error.
//
// detail is the runtime's own last error line; for PullRefused it is the
// host:port that refused the connection ("": the reference's registry).
func PullError(kind PullFailure, ref string, cred auth.Credential, names auth.VariableNames, storage, detail string) error {
	switch kind {
	case PullAuthRefused:
		switch cred.Source {
		case auth.UserVariables:
			return failure.Userf("pulling %s: the registry refused the credentials in %s/%s (user %s); fix these CI/CD variables",
				ref, names.Username, names.Password, cred.Username)
		case auth.JobToken:
			return failure.Systemf("pulling %s: the registry refused the %s; the runner will retry (if it persists, check the registry's token authentication)", ref, cred)
		}
		return PullError(PullNotFound, ref, cred, names, storage, detail)
	case PullNotFound:
		hint := "check the image name and tag"
		switch cred.Source {
		case auth.Anonymous:
			hint += ", or, if the registry needs a login, set " + names.Username + " and " + names.Password + " as CI/CD variables"
		case auth.JobToken:
			hint += ", and that this project's job token may read it"
		}
		return failure.Userf("pulling %s: image not found, or access denied (%s; %s)", ref, whatWasAsked(ref), hint)
	case PullTLS:
		return failure.Systemf("pulling %s: the registry's TLS certificate is not trusted on this host; the admin must install its CA or list the registry in insecure_registries: %s", ref, detail)
	case PullPlainHTTP:
		return failure.Systemf("pulling %s: the registry speaks plain HTTP; the admin must list it in insecure_registries to allow that: %s", ref, detail)
	case PullRefused:
		addr := detail
		if addr == "" {
			addr = registryAddr(ref)
		}
		return failure.Systemf("pulling %s: connection refused by %s: is the registry up? (a system failure: the runner will retry)", ref, addr)
	case PullUnreachable:
		return failure.Systemf("pulling %s: the registry is unreachable: %s", ref, detail)
	case PullStorage:
		return failure.Systemf("pulling %s: the image storage %s is broken (%s); remove it, it will be recreated", ref, storage, detail)
	}
	return failure.Systemf("pulling %s: %s", ref, detail)
}

// DigestError turns a failed digest lookup (package registry) into the
// same classes and advice as a failed pull; the lookup's errors are
// classified by their types (registry.Diagnose), not their text.
func DigestError(err error, ref string, cred auth.Credential, names auth.VariableNames) error {
	d := registry.Diagnose(err)
	kind := map[registry.Failure]PullFailure{
		registry.AuthRefused: PullAuthRefused,
		registry.NotFound:    PullNotFound,
		registry.TLS:         PullTLS,
		registry.PlainHTTP:   PullPlainHTTP,
		registry.Refused:     PullRefused,
		registry.Unreachable: PullUnreachable,
	}[d.Failure]
	if kind == PullRefused {
		return PullError(kind, ref, cred, names, "", d.Addr)
	}
	return PullError(kind, ref, cred, names, "", "resolving the tag: "+OneLine(d.Detail))
}

// whatWasAsked names the tag (or digest) and repository of a normalised
// reference, for a line that says which one is missing.
func whatWasAsked(ref string) string {
	named, err := reference.ParseNormalizedNamed(ref)
	if err != nil {
		return "reference " + ref
	}
	switch r := named.(type) {
	case reference.Digested:
		return fmt.Sprintf("digest %s of %s", r.Digest(), named.Name())
	case reference.Tagged:
		return fmt.Sprintf("tag %q of %s", r.Tag(), named.Name())
	}
	return fmt.Sprintf("tag %q of %s", "latest", named.Name())
}

// registryAddr is the host:port of a normalised reference's registry (443
// when it names no port).
func registryAddr(ref string) string {
	host := ref
	if named, err := reference.ParseNormalizedNamed(ref); err == nil {
		host = reference.Domain(named)
	}
	if _, _, err := net.SplitHostPort(host); err == nil {
		return host
	}
	return net.JoinHostPort(host, "443")
}

// StoreError classifies an error from the image store: a pull's own error
// keeps its class; the store's (locks, disk) is a system failure.
func StoreError(err error) error {
	if errors.As(err, new(*failure.Error)) {
		return err
	}
	return failure.Systemf("image store: %v", err)
}

// StoreTrace makes the image store's waits for the user's other jobs show
// in the job log, so that a prepare that waits says why.
func StoreTrace(ctx context.Context, log *joblog.Logger) context.Context {
	if log == nil {
		return ctx
	}
	return imagecache.WithTrace(ctx, imagecache.Trace{Waiting: func(reason string) {
		log.Printf("Waiting: %s.", reason)
	}})
}

// LogDamaged tells the job log when the stored image failed its check and
// was rebuilt.
func LogDamaged(log *joblog.Logger, res imagecache.Result) {
	if res.Damaged != nil && log != nil {
		log.Warnf("The stored image %s was damaged (%v); it was rebuilt.", res.Path, res.Damaged)
	}
}

// CacheState is the job-log word for how the store served an image.
func CacheState(res imagecache.Result) string {
	switch {
	case res.Hit && res.Waited:
		return "hit after waiting (another job built it)"
	case res.Hit:
		return "hit"
	}
	return "miss"
}

// GoPullFailure classifies the error line last of a failed pull by a
// program written in Go (Apptainer, Podman): their messages are Go's
// net/http, crypto/x509 and registry-client ones. tail is the output
// around it, where a refused connection's address is found. It returns
// the class and the detail for PullError ("" when the class says it all,
// the address for a refused connection, prog's own words otherwise).
func GoPullFailure(prog, last, tail string) (PullFailure, string) {
	switch {
	case strings.Contains(last, "authentication required") || strings.Contains(last, "unauthorized") ||
		strings.Contains(last, "requested access to the resource is denied"):
		return PullAuthRefused, last
	case strings.Contains(last, "manifest unknown") || strings.Contains(last, "name unknown") || strings.Contains(last, "not found"):
		return PullNotFound, last
	case strings.Contains(last, "server gave HTTP response to HTTPS client"):
		return PullPlainHTTP, last
	case strings.Contains(last, "x509:") || strings.Contains(last, "certificate"):
		return PullTLS, last
	case strings.Contains(last, "connect: connection refused"):
		// The address is Go's, "dial tcp H:P: connect: ...".
		if m := dialAddr().FindStringSubmatch(tail); m != nil {
			return PullRefused, m[1]
		}
		return PullRefused, ""
	case strings.Contains(last, "no such host") || strings.Contains(last, "i/o timeout") || strings.Contains(last, "dial tcp"):
		return PullUnreachable, last
	case strings.Contains(last, "no space left on device"):
		return PullStorage, last
	}
	if prog != "" {
		prog += " "
	}
	return PullOther, prog + "pull failed: " + last
}

var dialAddr = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`dial tcp (\S+): connect: connection refused`) })

// ShellProbe prints the shell stage scripts should run with: bash when the
// image has one, else sh (the runner's scripts work in both). It is a fixed
// script: no user data is ever part of it.
const ShellProbe = `for s in /bin/bash /usr/bin/bash; do if [ -x "$s" ]; then echo "$s"; exit 0; fi; done; echo /bin/sh`

// MissingSh is the user's failure when a runtime's error line about the
// shell probe says the image has no /bin/sh, else nil.
func MissingSh(ref, line string) error {
	if strings.Contains(line, "/bin/sh") && (strings.Contains(line, "no such file") || strings.Contains(line, "not found")) {
		return failure.Userf("image %s has no /bin/sh; use an image with a POSIX shell", ref)
	}
	return nil
}
