// Package apptainer runs job stages in Apptainer containers, with the same
// surface as the Charliecloud mechanism: `apptainer pull` of docker://
// images to SIF files in per-user storage, `apptainer exec --cleanenv` with
// same-path binds for the stages. Facts about Apptainer 1.5.3 are in
// docs/apptainer.md:
//
//   - a SIF is already a single file, so batch jobs need no conversion;
//   - binds to paths missing in the image work (Apptainer's underlay), so no
//     per-job copy of the image is needed;
//   - credentials travel as APPTAINER_DOCKER_USERNAME/PASSWORD in the pull's
//     environment; `registry login` (shared ~/.apptainer files) is never
//     used, and APPTAINER_CACHEDIR/APPTAINER_TMPDIR point at per-user dirs
//     the admin chooses;
//   - apptainer is given a complete, explicit environment: the host's
//     APPTAINER_*, SINGULARITY_* and LD_PRELOAD never reach it or the
//     container.
package apptainer

import (
	"path/filepath"
	"time"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/mechanism/kit"
	"github.com/ci-exec/ci-exec/internal/policy"
)

// Name is the run_mechanism value.
const Name = config.MechanismApptainer

// toolPath is the PATH of apptainer itself: it finds its FUSE helpers
// (squashfuse_ll, fuse2fs) there.
const toolPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Runtime is the Apptainer mechanism for one job user.
type Runtime struct {
	kit.Base
}

var _ mechanism.Runtime = (*Runtime)(nil)
var _ mechanism.PrepEnver = (*Runtime)(nil)

// New returns the runtime for the job user. hostEnv is the driver's own
// environment, consulted only for proxy and CA settings of pulls.
func New(cfg config.Mechanism, user config.UserInfo, hostEnv map[string]string, grace time.Duration) *Runtime {
	return &Runtime{Base: kit.NewBase(Name, cfg, user, hostEnv, grace, ".apptainer")}
}

// cacheDir and tmpDir are APPTAINER_CACHEDIR and APPTAINER_TMPDIR: under
// the admin's cache_dir/tmp_dir (per user), else inside the storage.
func (r *Runtime) cacheDir() string { return r.userDir(r.Cfg.CacheDir, "cache") }
func (r *Runtime) tmpDir() string   { return r.userDir(r.Cfg.TmpDir, "tmp") }

func (r *Runtime) userDir(root, inStorage string) string {
	if root == "" {
		return filepath.Join(r.Storage, inStorage)
	}
	return filepath.Join(root, r.User.Name)
}

func (r *Runtime) Name() string             { return Name }
func (r *Runtime) UserArgsVariable() string { return "JACAMAR_CI_APPTAINER_ARGS" }

// credentialVariables are the user's registry variables: the ones
// apptainer itself reads.
var credentialVariables = auth.VariableNames{Username: "APPTAINER_DOCKER_USERNAME", Password: "APPTAINER_DOCKER_PASSWORD"}

func (r *Runtime) CredentialVariables() auth.VariableNames { return credentialVariables }

// PrepEnv tells prep_script where the user's image storage is.
func (r *Runtime) PrepEnv() []string { return []string{"CI_EXEC_APPTAINER_STORAGE=" + r.Storage} }

// toolEnv is the environment of `apptainer pull` (see kit.ToolEnv).
func (r *Runtime) toolEnv(cred auth.Credential) []string {
	path := r.ToolPath(toolPath)
	settings := []string{"APPTAINER_CACHEDIR=" + r.cacheDir(), "APPTAINER_TMPDIR=" + r.tmpDir()}
	return kit.ToolEnv(r.User, path, settings, r.HostEnv, false, cred, credentialVariables)
}

// RunFlags is `apptainer exec`'s option table (1.5.3, cmd/internal/cli).
func (r *Runtime) RunFlags() policy.FlagTable { return runFlags }

var runFlags = policy.FlagTable{
	{Long: "--add-caps", Arg: policy.RequiredArg},
	{Long: "--allow-setuid", Arg: policy.NoArg},
	{Long: "--app", Arg: policy.RequiredArg},
	{Long: "--apply-cgroups", Arg: policy.RequiredArg},
	{Long: "--authfile", Arg: policy.RequiredArg},
	{Long: "--bind", Short: "-B", Arg: policy.RequiredArg},
	{Long: "--blkio-weight", Arg: policy.RequiredArg},
	{Long: "--blkio-weight-device", Arg: policy.RequiredArg},
	{Long: "--cdi-dirs", Arg: policy.RequiredArg},
	{Long: "--cleanenv", Short: "-e", Arg: policy.NoArg},
	{Long: "--compat", Arg: policy.NoArg},
	{Long: "--contain", Short: "-c", Arg: policy.NoArg},
	{Long: "--containall", Short: "-C", Arg: policy.NoArg},
	{Long: "--containlibs", Arg: policy.RequiredArg},
	{Long: "--cpu-shares", Arg: policy.RequiredArg},
	{Long: "--cpus", Arg: policy.RequiredArg},
	{Long: "--cpuset-cpus", Arg: policy.RequiredArg},
	{Long: "--cpuset-mems", Arg: policy.RequiredArg},
	{Long: "--cwd", Arg: policy.RequiredArg},
	{Long: "--device", Arg: policy.RequiredArg},
	{Long: "--disable-cache", Arg: policy.NoArg},
	{Long: "--dmtcp-launch", Arg: policy.RequiredArg},
	{Long: "--dmtcp-restart", Arg: policy.RequiredArg},
	{Long: "--dns", Arg: policy.RequiredArg},
	{Long: "--docker-host", Arg: policy.RequiredArg},
	{Long: "--docker-login", Arg: policy.NoArg},
	{Long: "--docker-password", Arg: policy.RequiredArg},
	{Long: "--docker-username", Arg: policy.RequiredArg},
	{Long: "--drop-caps", Arg: policy.RequiredArg},
	{Long: "--env", Arg: policy.RequiredArg},
	{Long: "--env-file", Arg: policy.RequiredArg},
	{Long: "--fakeroot", Short: "-f", Arg: policy.NoArg},
	{Long: "--fusemount", Arg: policy.RequiredArg},
	{Long: "--home", Short: "-H", Arg: policy.RequiredArg},
	{Long: "--hostname", Arg: policy.RequiredArg},
	{Long: "--intel-hpu", Arg: policy.NoArg},
	{Long: "--ipc", Short: "-i", Arg: policy.NoArg},
	{Long: "--keep-privs", Arg: policy.NoArg},
	{Long: "--memory", Arg: policy.RequiredArg},
	{Long: "--memory-reservation", Arg: policy.RequiredArg},
	{Long: "--memory-swap", Arg: policy.RequiredArg},
	{Long: "--mount", Arg: policy.RequiredArg},
	{Long: "--net", Short: "-n", Arg: policy.NoArg},
	{Long: "--network", Arg: policy.RequiredArg},
	{Long: "--network-args", Arg: policy.RequiredArg},
	{Long: "--netns-path", Arg: policy.RequiredArg},
	{Long: "--no-env", Arg: policy.RequiredArg},
	{Long: "--no-eval", Arg: policy.NoArg},
	{Long: "--no-home", Arg: policy.NoArg},
	{Long: "--no-https", Arg: policy.NoArg},
	{Long: "--nohttps", Arg: policy.NoArg},
	{Long: "--no-init", Arg: policy.NoArg},
	{Long: "--no-mount", Arg: policy.RequiredArg},
	{Long: "--no-nv", Arg: policy.NoArg},
	{Long: "--no-pid", Arg: policy.NoArg},
	{Long: "--no-privs", Arg: policy.NoArg},
	{Long: "--no-rocm", Arg: policy.NoArg},
	{Long: "--no-umask", Arg: policy.NoArg},
	{Long: "--nv", Arg: policy.NoArg},
	{Long: "--nvccli", Arg: policy.NoArg},
	{Long: "--oom-kill-disable", Arg: policy.NoArg},
	{Long: "--overlay", Short: "-o", Arg: policy.RequiredArg},
	{Long: "--passphrase", Arg: policy.NoArg},
	{Long: "--pem-path", Arg: policy.RequiredArg},
	{Long: "--pid", Short: "-p", Arg: policy.NoArg},
	{Long: "--pids-limit", Arg: policy.RequiredArg},
	{Long: "--pwd", Arg: policy.RequiredArg},
	{Long: "--rocm", Arg: policy.NoArg},
	{Long: "--scratch", Short: "-S", Arg: policy.RequiredArg},
	{Long: "--security", Arg: policy.RequiredArg},
	{Long: "--sharens", Arg: policy.NoArg},
	{Long: "--tmpdir", Arg: policy.RequiredArg},
	{Long: "--underlay", Arg: policy.NoArg},
	{Long: "--unsquash", Arg: policy.NoArg},
	{Long: "--userns", Short: "-u", Arg: policy.NoArg},
	{Long: "--uts", Arg: policy.NoArg},
	{Long: "--workdir", Short: "-W", Arg: policy.RequiredArg},
	{Long: "--writable", Short: "-w", Arg: policy.NoArg},
	{Long: "--writable-tmpfs", Arg: policy.NoArg},
	{Long: "--help", Short: "-h", Arg: policy.NoArg},
}

// DefaultUserArgs are the exec flags users may pass unless the admin lists
// others: environment settings, a writable tmpfs over the image, isolation
// that only takes things away (--contain, --containall, --no-home, --pid,
// --ipc, --no-init, --no-eval), the start directory and GPU libraries. None
// of them mounts host paths, changes identity or capabilities, reaches a
// registry, or picks another image.
func (r *Runtime) DefaultUserArgs() []string {
	return []string{"--env", "--writable-tmpfs", "--contain", "--containall", "--no-home", "--pid", "--ipc",
		"--no-init", "--no-eval", "--pwd", "--cwd", "--nv", "--rocm", "--no-umask"}
}
