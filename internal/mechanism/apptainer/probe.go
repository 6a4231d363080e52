package apptainer

import (
	"context"
	"fmt"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/mechanism/kit"
)

// probeTimeout bounds each probe command.
const probeTimeout = 30 * time.Second

// Features Probe reports in Info.Features.
const (
	// FeatureUnderlay: exec --underlay (binds to paths missing in the
	// image).
	FeatureUnderlay = "underlay"
)

// Probe finds apptainer and asks it for its version and exec options, once
// per process.
func (r *Runtime) Probe(ctx context.Context) (mechanism.Info, error) {
	return r.Probed(ctx, []string{"apptainer"}, nil, r.probe)
}

func (r *Runtime) probe(ctx context.Context, info mechanism.Info) (mechanism.Info, error) {
	info.ReadOnlyBinds = true
	bin := info.Programs["apptainer"]
	out, err := r.Query(ctx, toolPath, bin, "version")
	if err != nil {
		return info, failure.Systemf("apptainer: %s version failed: %v: %s", bin, err, kit.OneLine(out))
	}
	if info.Version, err = ParseVersion(out); err != nil {
		return info, failure.Systemf("apptainer: %v", err)
	}
	help, err := r.Query(ctx, toolPath, bin, "exec", "--help")
	if err != nil {
		return info, failure.Systemf("apptainer: %s exec --help failed: %v: %s", bin, err, kit.OneLine(help))
	}
	info.Features[FeatureUnderlay] = strings.Contains(help, "--underlay")
	return info, nil
}

var versionRE = sync.OnceValue(func() *regexp.Regexp {
	return regexp.MustCompile(`(?m)^\s*(?:apptainer version\s+)?v?([0-9]+\.[0-9]+(?:\.[0-9]+)?(?:[-+~][0-9A-Za-z.+~-]*)?)\s*$`)
})

// ParseVersion reads `apptainer version` output ("1.5.3", or
// "1.4.0-rc.1+12-gabc" for builds from git).
func ParseVersion(out string) (string, error) {
	m := versionRE().FindStringSubmatch(out)
	if m == nil {
		return "", fmt.Errorf("cannot read the version from apptainer version output %q", kit.OneLine(out))
	}
	return m[1], nil
}
