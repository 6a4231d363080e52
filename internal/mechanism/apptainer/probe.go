package apptainer

import (
	"context"
	"fmt"
	"maps"
	"os"
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
	// featureMemoryFlag: exec has --cpus and --memory (whether the host
	// can enforce them is mechanism.FeatureLimits, probed in every stage).
	featureMemoryFlag = "memory-flag"
)

// Probe finds apptainer and asks it for its version and exec options, once
// per process.
func (r *Runtime) Probe(ctx context.Context) (mechanism.Info, error) {
	info, err := r.Probed(ctx, []string{"apptainer"}, nil, r.probe)
	if err != nil {
		return info, err
	}
	// Whether limits can be enforced is read afresh (two small files), not
	// from the probe cache: that is the user's own file, and a job must not
	// shed the admin's limits by editing it.
	features := maps.Clone(info.Features)
	limits, _ := kit.CgroupLimits(os.Getuid())
	features[mechanism.FeatureLimits] = limits && features[featureMemoryFlag]
	info.Features = features
	return info, nil
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
	// --nv needs nothing at probe time (no GPU here means apptainer warns
	// and runs on); --cpus/--memory need cgroup v2 delegation, which is
	// probed (docs/apptainer.md).
	info.Features[mechanism.FeatureGPU] = strings.Contains(help, "--nv")
	info.Features[mechanism.FeatureServices] = true
	info.Features[featureMemoryFlag] = strings.Contains(help, "--memory")
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
