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
)

// Name is the run_mechanism value.
const Name = config.MechanismApptainer

// toolPath is the PATH of apptainer itself: it finds its FUSE helpers
// (squashfuse_ll, fuse2fs) there.
const toolPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Runtime is the Apptainer mechanism for one job user.
type Runtime struct {
	mechanism.Base
}

var _ mechanism.Runtime = (*Runtime)(nil)
var _ mechanism.PrepEnver = (*Runtime)(nil)

// New returns the runtime for the job user. hostEnv is the driver's own
// environment, consulted only for proxy and CA settings of pulls.
func New(cfg config.Mechanism, user config.UserInfo, hostEnv map[string]string, grace time.Duration) *Runtime {
	return &Runtime{Base: mechanism.NewBase(Name, cfg, user, hostEnv, grace, ".apptainer")}
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

// toolEnv is the environment of `apptainer pull` (see mechanism.ToolEnv).
func (r *Runtime) toolEnv(cred auth.Credential) []string {
	path := r.ToolPath(toolPath)
	settings := []string{"APPTAINER_CACHEDIR=" + r.cacheDir(), "APPTAINER_TMPDIR=" + r.tmpDir()}
	return mechanism.ToolEnv(r.User, path, settings, r.HostEnv, false, cred, credentialVariables)
}

// RunFlags is `apptainer exec`'s option table (1.5.3, cmd/internal/cli).
func (r *Runtime) RunFlags() mechanism.FlagTable { return runFlags }

var runFlags = mechanism.FlagTable{
	{Long: "--add-caps", Arg: mechanism.RequiredArg},
	{Long: "--allow-setuid", Arg: mechanism.NoArg},
	{Long: "--app", Arg: mechanism.RequiredArg},
	{Long: "--apply-cgroups", Arg: mechanism.RequiredArg},
	{Long: "--authfile", Arg: mechanism.RequiredArg},
	{Long: "--bind", Short: "-B", Arg: mechanism.RequiredArg},
	{Long: "--blkio-weight", Arg: mechanism.RequiredArg},
	{Long: "--blkio-weight-device", Arg: mechanism.RequiredArg},
	{Long: "--cdi-dirs", Arg: mechanism.RequiredArg},
	{Long: "--cleanenv", Short: "-e", Arg: mechanism.NoArg},
	{Long: "--compat", Arg: mechanism.NoArg},
	{Long: "--contain", Short: "-c", Arg: mechanism.NoArg},
	{Long: "--containall", Short: "-C", Arg: mechanism.NoArg},
	{Long: "--containlibs", Arg: mechanism.RequiredArg},
	{Long: "--cpu-shares", Arg: mechanism.RequiredArg},
	{Long: "--cpus", Arg: mechanism.RequiredArg},
	{Long: "--cpuset-cpus", Arg: mechanism.RequiredArg},
	{Long: "--cpuset-mems", Arg: mechanism.RequiredArg},
	{Long: "--cwd", Arg: mechanism.RequiredArg},
	{Long: "--device", Arg: mechanism.RequiredArg},
	{Long: "--disable-cache", Arg: mechanism.NoArg},
	{Long: "--dmtcp-launch", Arg: mechanism.RequiredArg},
	{Long: "--dmtcp-restart", Arg: mechanism.RequiredArg},
	{Long: "--dns", Arg: mechanism.RequiredArg},
	{Long: "--docker-host", Arg: mechanism.RequiredArg},
	{Long: "--docker-login", Arg: mechanism.NoArg},
	{Long: "--docker-password", Arg: mechanism.RequiredArg},
	{Long: "--docker-username", Arg: mechanism.RequiredArg},
	{Long: "--drop-caps", Arg: mechanism.RequiredArg},
	{Long: "--env", Arg: mechanism.RequiredArg},
	{Long: "--env-file", Arg: mechanism.RequiredArg},
	{Long: "--fakeroot", Short: "-f", Arg: mechanism.NoArg},
	{Long: "--fusemount", Arg: mechanism.RequiredArg},
	{Long: "--home", Short: "-H", Arg: mechanism.RequiredArg},
	{Long: "--hostname", Arg: mechanism.RequiredArg},
	{Long: "--intel-hpu", Arg: mechanism.NoArg},
	{Long: "--ipc", Short: "-i", Arg: mechanism.NoArg},
	{Long: "--keep-privs", Arg: mechanism.NoArg},
	{Long: "--memory", Arg: mechanism.RequiredArg},
	{Long: "--memory-reservation", Arg: mechanism.RequiredArg},
	{Long: "--memory-swap", Arg: mechanism.RequiredArg},
	{Long: "--mount", Arg: mechanism.RequiredArg},
	{Long: "--net", Short: "-n", Arg: mechanism.NoArg},
	{Long: "--network", Arg: mechanism.RequiredArg},
	{Long: "--network-args", Arg: mechanism.RequiredArg},
	{Long: "--netns-path", Arg: mechanism.RequiredArg},
	{Long: "--no-env", Arg: mechanism.RequiredArg},
	{Long: "--no-eval", Arg: mechanism.NoArg},
	{Long: "--no-home", Arg: mechanism.NoArg},
	{Long: "--no-https", Arg: mechanism.NoArg},
	{Long: "--nohttps", Arg: mechanism.NoArg},
	{Long: "--no-init", Arg: mechanism.NoArg},
	{Long: "--no-mount", Arg: mechanism.RequiredArg},
	{Long: "--no-nv", Arg: mechanism.NoArg},
	{Long: "--no-pid", Arg: mechanism.NoArg},
	{Long: "--no-privs", Arg: mechanism.NoArg},
	{Long: "--no-rocm", Arg: mechanism.NoArg},
	{Long: "--no-umask", Arg: mechanism.NoArg},
	{Long: "--nv", Arg: mechanism.NoArg},
	{Long: "--nvccli", Arg: mechanism.NoArg},
	{Long: "--oom-kill-disable", Arg: mechanism.NoArg},
	{Long: "--overlay", Short: "-o", Arg: mechanism.RequiredArg},
	{Long: "--passphrase", Arg: mechanism.NoArg},
	{Long: "--pem-path", Arg: mechanism.RequiredArg},
	{Long: "--pid", Short: "-p", Arg: mechanism.NoArg},
	{Long: "--pids-limit", Arg: mechanism.RequiredArg},
	{Long: "--pwd", Arg: mechanism.RequiredArg},
	{Long: "--rocm", Arg: mechanism.NoArg},
	{Long: "--scratch", Short: "-S", Arg: mechanism.RequiredArg},
	{Long: "--security", Arg: mechanism.RequiredArg},
	{Long: "--sharens", Arg: mechanism.NoArg},
	{Long: "--tmpdir", Arg: mechanism.RequiredArg},
	{Long: "--underlay", Arg: mechanism.NoArg},
	{Long: "--unsquash", Arg: mechanism.NoArg},
	{Long: "--userns", Short: "-u", Arg: mechanism.NoArg},
	{Long: "--uts", Arg: mechanism.NoArg},
	{Long: "--workdir", Short: "-W", Arg: mechanism.RequiredArg},
	{Long: "--writable", Short: "-w", Arg: mechanism.NoArg},
	{Long: "--writable-tmpfs", Arg: mechanism.NoArg},
	{Long: "--help", Short: "-h", Arg: mechanism.NoArg},
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
