package podman

import (
	"context"
	"fmt"
	"regexp"
	"strings"
	"sync"

	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/mechanism/kit"
)

// Features Probe reports in Info.Features: run options ci-exec needs and
// that a podman older than the tested 4.3 may lack.
const (
	// FeatureReplace: run --replace (a stage replaces the container a
	// killed earlier stage left).
	FeatureReplace = "replace"
	// FeaturePreserveFDs: run --preserve-fds (the start signal's fd).
	FeaturePreserveFDs = "preserve-fds"
	// FeatureInit: run --init (a PID 1 that forwards signals and reaps, so
	// a script killed by a signal reports 128+N as elsewhere).
	FeatureInit = "init"
	// FeatureLogDriverNone: run --log-driver none (no copy of the job's
	// output in Podman's storage).
	FeatureLogDriverNone = "log-driver"
)

// Probe finds podman and asks it for its version and run options, once
// per process.
func (r *Runtime) Probe(ctx context.Context) (mechanism.Info, error) {
	return r.Probed(ctx, []string{"podman"}, nil, r.probe)
}

func (r *Runtime) probe(ctx context.Context, info mechanism.Info) (mechanism.Info, error) {
	info.ReadOnlyBinds = true
	bin := info.Programs["podman"]
	// --version needs no storage, no user namespace and no pause process.
	out, err := r.Query(ctx, toolPath, bin, "--version")
	if err != nil {
		return info, failure.Systemf("podman: %s --version failed: %v: %s", bin, err, kit.OneLine(out))
	}
	if info.Version, err = ParseVersion(out); err != nil {
		return info, failure.Systemf("podman: %v", err)
	}
	help, err := r.Query(ctx, toolPath, bin, "run", "--help")
	if err != nil {
		return info, failure.Systemf("podman: %s run --help failed: %v: %s", bin, err, kit.OneLine(help))
	}
	for f, opt := range map[string]string{FeatureReplace: "--replace", FeaturePreserveFDs: "--preserve-fds", FeatureInit: "--init ", FeatureLogDriverNone: "--log-driver"} {
		info.Features[f] = strings.Contains(help, opt)
	}
	if !info.Features[FeaturePreserveFDs] || !info.Features[FeatureReplace] {
		return info, failure.Systemf("podman %s at %s has no run --preserve-fds or --replace; ci-exec needs Podman 4.0 or later", info.Version, bin)
	}
	return info, nil
}

var versionRE = sync.OnceValue(func() *regexp.Regexp {
	return regexp.MustCompile(`(?m)^podman(?:-remote)? version\s+v?([0-9]+\.[0-9]+(?:\.[0-9]+)?(?:[-+~][0-9A-Za-z.+~-]*)?)\s*$`)
})

// ParseVersion reads `podman --version` output ("podman version 4.3.1").
func ParseVersion(out string) (string, error) {
	m := versionRE().FindStringSubmatch(out)
	if m == nil {
		return "", fmt.Errorf("cannot read the version from podman --version output %q", kit.OneLine(out))
	}
	return m[1], nil
}
