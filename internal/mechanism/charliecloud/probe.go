package charliecloud

import (
	"context"
	"fmt"
	"regexp"
	"sync"
	"time"

	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/mechanism/kit"
)

// Features Probe reports in Info.Features.
const (
	// FeatureWriteFake: ch-run --write-fake (a writable tmpfs overlay over
	// the image; Charliecloud 0.32+, absent from 0.31).
	FeatureWriteFake = "write-fake"
)

// probeTimeout bounds each probe command; ch-run answers in milliseconds.
const probeTimeout = 30 * time.Second

// Probe finds ch-run, ch-image and ch-convert and asks ch-run for its
// version and options, once per process.
func (r *Runtime) Probe(ctx context.Context) (mechanism.Info, error) {
	// ch-convert is needed only for conversions; Pull says so.
	// ch-fromhost and nvidia-container-cli only for GPU jobs (FeatureGPU).
	return r.Probed(ctx, []string{"ch-run", "ch-image"}, []string{"ch-convert", "ch-fromhost", "nvidia-container-cli"}, r.probe)
}

func (r *Runtime) probe(ctx context.Context, info mechanism.Info) (mechanism.Info, error) {
	chRun := info.Programs["ch-run"]
	out, err := r.Query(ctx, toolPath, chRun, "--version")
	if err != nil {
		return info, failure.Systemf("charliecloud: %s --version failed: %v: %s", chRun, err, kit.OneLine(out))
	}
	if info.Version, err = ParseVersion(out); err != nil {
		return info, failure.Systemf("charliecloud: %v", err)
	}
	help, err := r.Query(ctx, toolPath, chRun, "--help")
	if err != nil {
		return info, failure.Systemf("charliecloud: %s --help failed: %v: %s", chRun, err, kit.OneLine(help))
	}
	for k, v := range ParseFeatures(help) {
		info.Features[k] = v
	}
	// No ch-run release can bind read-only (-b takes SRC[:DST] only).
	info.ReadOnlyBinds = false
	// Without a writable overlay a bind's destination must exist in the
	// image: the stages build the container's view on a skeleton.
	info.FixedMountPoints = !info.Features[FeatureWriteFake]
	// A service is a ch-run in the background (package stages). ch-run
	// has no cgroup limits and no tmpfs size: those features stay off and
	// the stages say so.
	info.Features[mechanism.FeatureServices] = true
	// GPU jobs get the host's NVIDIA libraries injected into their own
	// image copy at prepare (ch-fromhost --nvidia asks
	// nvidia-container-cli what to inject).
	info.Features[mechanism.FeatureGPU] = info.Programs["ch-fromhost"] != "" && info.Programs["nvidia-container-cli"] != ""
	return info, nil
}

var versionRE = sync.OnceValue(func() *regexp.Regexp {
	return regexp.MustCompile(`(?m)^\s*(?:ch-run\s+)?v?([0-9]+\.[0-9]+(?:\.[0-9]+)?(?:[~+.-][0-9A-Za-z.+~-]*)?)\s*$`)
})

// ParseVersion reads `ch-run --version` output: "0.31" on Debian 12,
// "0.38" or "0.39~pre+1a2b3c" elsewhere.
func ParseVersion(out string) (string, error) {
	m := versionRE().FindStringSubmatch(out)
	if m == nil {
		return "", fmt.Errorf("cannot read the version from ch-run --version output %q", kit.OneLine(out))
	}
	return m[1], nil
}

// ParseFeatures reads the options `ch-run --help` lists. --feature cannot
// be used for this: 0.31 knows only "extglob".
func ParseFeatures(help string) map[string]bool {
	return map[string]bool{
		FeatureWriteFake: regexp.MustCompile(`(?m)^\s*(-W,\s*)?--write-fake\b`).MatchString(help),
	}
}
