// Package mechanism is the contract between the stages and a container
// runtime (Charliecloud in ./charliecloud, Apptainer in ./apptainer): the
// Runtime interface and the plain data it works with (Info, Image,
// PullRequest, RunSpec). Command is pure, so every runtime's command line is
// golden-tested without the runtime installed. The runtimes share their
// helpers through ./kit; the admin's rules are in package policy; putting
// them together per stage is package stages' job.
package mechanism

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/imagecache"
	"github.com/ci-exec/ci-exec/internal/joblog"
	"github.com/ci-exec/ci-exec/internal/policy"
)

// Runtime is one container runtime. Methods that touch the system take a
// context; Command is pure, so command lines are golden-tested without the
// runtime installed.
//
// Errors follow package failure: a failure.User error for what the job's
// author must fix (image not found, registry refused their credentials),
// anything else is a system failure.
type Runtime interface {
	// Name is the run_mechanism value ("charliecloud").
	Name() string
	// UserArgsVariable is the job variable with the user's extra run
	// arguments (JACAMAR_CI_CHARLIECLOUD_ARGS).
	UserArgsVariable() string
	// CredentialVariables are the job variables with the user's own
	// registry credentials (CH_IMAGE_USERNAME/CH_IMAGE_PASSWORD).
	CredentialVariables() auth.VariableNames
	// RunFlags describes the run command's options, for checking user
	// arguments; DefaultUserArgs is the safe subset users may pass when the
	// admin lists none (no bind, write, uid/gid, storage or mount flags).
	RunFlags() policy.FlagTable
	DefaultUserArgs() []string

	// Probe finds the runtime's programs and reports its version and
	// features. Implementations cache the answer for the process.
	Probe(ctx context.Context) (Info, error)
	// Pull makes the image available to this job: resolves its digest (by
	// the request's policy), fetches it into the user's store unless that
	// digest is there already, converts it to a single file when the
	// request asks (SquashFS, SIF: batch jobs, or the admin's convert),
	// gives the job its own copy or a lease on the shared entry, creates
	// the bind mount points where the runtime needs them, and finds the
	// image's shell.
	Pull(ctx context.Context, req PullRequest) (Image, error)
	// Command builds the argv and environment that run spec.Argv in the
	// image. It must not do I/O: everything it needs is in spec.
	Command(spec RunSpec) (argv, env []string, err error)
	// Diagnose looks at a failed run (exit code and the tail of its stderr)
	// and returns what looks like the runtime's own error message ("" when
	// nothing does). A script can print the same text, so the caller uses
	// it only when the start signal shows the script never began (package
	// outcome).
	Diagnose(exitCode int, stderrTail string) string
	// CheckImage reports whether img, as loaded from the job's state,
	// names what this runtime's Pull makes: a name or file in the user's
	// own storage or store, per-job paths only in jobDir (the job's state
	// dir). Stages call it before they run anything from the state.
	CheckImage(img Image, jobDir string) error
	// Release removes the job's per-job copies of img (cleanup stage):
	// only per-job names in the runtime's storage or in jobDir (the job's
	// scripts dir), whatever the state file lists.
	Release(ctx context.Context, img Image, jobDir string) error
}

// Evicter is implemented by runtimes with a store of converted images
// (see Base.Evict): prepare applies the admin's limits after each pull.
type Evicter interface {
	Evict(ctx context.Context) ([]imagecache.Evicted, error)
}

// Helpers is implemented by runtimes whose own helper processes outlive
// each of their commands by design (rootless Podman's pause process, which
// holds the user's namespace): the stage ends them like any leftover, but
// does not name them in the job log as the script's.
type Helpers interface {
	HelperProcesses() []string
}

// PrepEnver is implemented by runtimes that give prep_script extra
// variables (e.g. where the user's image storage is).
type PrepEnver interface {
	PrepEnv() []string
}

// Info is what Probe found. Each stage probes (Base.Probed remembers the
// answer in the user's store while the programs do not change) and hands
// it to Command.
type Info struct {
	// Version is the runtime's version ("0.31").
	Version string `json:"version"`
	// Programs maps program names to absolute paths ("ch-run" →
	// "/usr/bin/ch-run").
	Programs map[string]string `json:"programs"`
	// Features are runtime-specific capabilities ("write-fake").
	Features map[string]bool `json:"features,omitempty"`
	// ReadOnlyBinds says whether binds can be read-only (SRC:DST:ro).
	ReadOnlyBinds bool `json:"read_only_binds"`
	// FixedMountPoints says that a bind's destination must already exist
	// in the image (Charliecloud without a writable image): stages then
	// build the container's view on a skeleton (see stages' container view).
	FixedMountPoints bool `json:"fixed_mount_points,omitempty"`
}

// Program returns the path of a runtime program (name itself if unknown).
func (i Info) Program(name string) string {
	if p := i.Programs[name]; p != "" {
		return p
	}
	return name
}

// Describe is the job-log form: "charliecloud 0.31 (/usr/bin/ch-run, ...)".
func (i Info) Describe(name string) string {
	progs := make([]string, 0, len(i.Programs))
	for _, p := range i.Programs {
		progs = append(progs, p)
	}
	sort.Strings(progs)
	return fmt.Sprintf("%s %s (%s)", name, i.Version, strings.Join(progs, ", "))
}

// Image is a prepared image, as saved in the state file.
type Image struct {
	// Ref is the normalised reference it came from.
	Ref string `json:"ref"`
	// Handle is what the run command names: an image name in the runtime's
	// storage, or the path of a .sqfs/.sif file or directory.
	Handle string `json:"handle"`
	// Format is runtime-specific ("storage", "squashfs", "sif", "sandbox").
	Format string `json:"format"`
	// Digest is the manifest digest ("sha256:...") when known.
	Digest string `json:"digest,omitempty"`
	// Shell is the absolute path, inside the image, of the shell that runs
	// stage scripts: bash when the image has it, else a POSIX sh (the
	// runner's scripts work in both).
	Shell string `json:"shell"`
	// RunOptions are image-specific run options the runtime chose at
	// prepare time (e.g. ch-run --set-env to load the image's environment).
	RunOptions []string `json:"run_options,omitempty"`
	// Private lists per-job paths (copies, mount points) that Release
	// removes.
	Private []string `json:"private,omitempty"`
	// Lease is the job's use marker on a shared store entry (see package
	// imagecache); Release ends it.
	Lease string `json:"lease,omitempty"`
	// Cache says how the store served the image: "hit", "hit after
	// waiting" (another job built it meanwhile) or "miss".
	Cache string `json:"cache,omitempty"`
	// PullTime and ConvertTime are the time spent pulling and converting
	// (0 when the store had the image); ReadyTime is the whole of Pull.
	PullTime    time.Duration `json:"pull_time,omitempty"`
	ConvertTime time.Duration `json:"convert_time,omitempty"`
	ReadyTime   time.Duration `json:"ready_time"`
}

// PullRequest is one image to make available.
type PullRequest struct {
	Ref policy.Ref
	// Policy is config.PullAlways, PullIfNotPresent or PullNever.
	Policy string
	// Credential is what the registry gets (see package auth).
	Credential auth.Credential
	// Insecure skips TLS verification for this registry (the admin's
	// insecure_registries).
	Insecure bool
	// JobKey is unique per job and image role, made of [a-z0-9-]: runtimes
	// that copy the image per job name the copy after it.
	JobKey string
	// MountPoints are absolute container paths that must exist as
	// directories in the image for the binds (same-path dirs, volume
	// destinations). Runtimes without a writable overlay create them in the
	// job's copy, never following a symlink inside the image.
	MountPoints []string
	// Dir is the job's private state dir, which no container sees: per-job
	// copies, links and mount points go there.
	Dir string
	// SingleFile asks for the image as one file (batch executors, the
	// admin's convert), unless the runtime's pull gives one anyway.
	SingleFile bool
	// GPU prepares the job's image for the host's GPUs where the runtime
	// does that at pull time (Charliecloud: ch-fromhost --nvidia into the
	// job's own copy); runtimes that do it at run time (RunSpec.GPU)
	// ignore it.
	GPU bool
	Log *joblog.Logger
}

// RunSpec is one stage's container command, as plain data.
type RunSpec struct {
	Info  Info
	Image Image
	// Binds in order: same-path dirs first, then user volumes.
	Binds []policy.Bind
	// Workdir is the initial working directory inside the container.
	Workdir string
	// Env is the container's complete environment (KEY=VALUE, sorted);
	// nothing else from the host leaks in.
	Env []string
	// AdminOptions are custom_options or runner_options (trusted, as given).
	AdminOptions []string
	// UserArgs passed the allowlist (UserArgsPolicy).
	UserArgs []string
	// Argv is the command to run in the container: the image's shell
	// running the stage script, behind the start signal
	// (outcome.StartCommand).
	Argv []string

	// The fields below are issue 15's; a runtime that cannot do one says
	// so in Info.Features (FeatureGPU, FeatureLimits, FeatureTmpSize) and
	// the stages never set it for that runtime.

	// GPU turns the runtime's GPU support on (Apptainer --nv).
	GPU bool
	// Limits are the job's CPU and memory limits, set only when Probe
	// reported FeatureLimits; TmpSize is a private /tmp of that size, set
	// only with FeatureTmpSize.
	Limits Limits
	// Service runs Argv as a background service rather than a stage (no
	// start signal). With ImageEntrypoint, Argv are arguments for the
	// image's own entrypoint (empty: its own command too), as Docker runs
	// a service without entrypoint:; a runtime that cannot read the
	// image's entrypoint runs Argv as the command, and refuses an empty
	// one.
	Service         bool
	ImageEntrypoint bool
}

// Limits are resource limits for one container (0: none).
type Limits struct {
	CPUs        int   `json:"cpus,omitempty"`
	MemoryBytes int64 `json:"memory,omitempty"`
	TmpBytes    int64 `json:"tmp,omitempty"`
}

// Features a runtime's Probe may report beside its own.
const (
	// FeatureGPU: Command honours RunSpec.GPU.
	FeatureGPU = "gpu"
	// FeatureLimits: Command honours Limits.CPUs and MemoryBytes, and the
	// host can enforce them (probed: cgroup v2 with the controllers
	// delegated to the user).
	FeatureLimits = "limits"
	// FeatureTmpSize: Command honours Limits.TmpBytes.
	FeatureTmpSize = "tmp-size"
	// FeatureServices: Command honours RunSpec.Service.
	FeatureServices = "services"
)
