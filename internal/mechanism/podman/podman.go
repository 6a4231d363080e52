// Package podman runs job stages in Podman containers (Debian's 4.3 is
// the tested one), with the same surface as the Charliecloud and Apptainer
// mechanisms:
//
//   - images are pulled by their exact manifest digest into Podman's own
//     storage, one storage per user under image_storage_dir (--root,
//     --runroot), never the user's ~/.local/share/containers; the user's
//     store (package imagecache) holds one small record per digest that
//     names the image, so concurrent jobs pull it once, leases keep it
//     while a job uses it, and eviction removes it (podman rmi) under the
//     same limits as the other runtimes' files;
//   - registry credentials go in a per-job 0600 --authfile in the job's
//     state dir, removed after the pull (and again at cleanup), never on
//     the command line;
//   - stages run with `podman run --rm --init --network host`, as the job
//     user: rootless with --userns=keep-id, so the job's files belong to the
//     user on the host (rootful Podman 4.3 refuses keep-id; root runs
//     without it);
//   - each stage's container is named after the job (ci-exec-<job key>),
//     --replace'd by the next stage and removed (podman rm -f) at cleanup,
//     so a cancelled stage leaves no container behind;
//   - Podman gets a complete, explicit environment: its own XDG dirs under
//     the user's storage (so no user's ~/.config/containers changes what
//     it runs), and the container's variables by name (--env NAME), their
//     values in Podman's environment, not on its command line.
package podman

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"path/filepath"
	"time"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/mechanism/kit"
	"github.com/ci-exec/ci-exec/internal/policy"
)

// Name is the run_mechanism value.
const Name = config.MechanismPodman

// toolPath is the PATH of podman itself: it finds conmon, runc/crun,
// slirp4netns and catatonit there (or where containers.conf says).
const toolPath = kit.SystemPath

// Runtime is the Podman mechanism for one job user.
type Runtime struct {
	kit.Base
	// uid is the job user's uid: rootless (keep-id) unless 0.
	uid int
}

var _ mechanism.Runtime = (*Runtime)(nil)
var _ mechanism.PrepEnver = (*Runtime)(nil)
var _ mechanism.Evicter = (*Runtime)(nil)
var _ mechanism.Helpers = (*Runtime)(nil)

// HelperProcesses are Podman's own processes that outlive a podman
// command by design: rootless Podman's pause process (catatonit -P, or
// podman itself without catatonit) that holds the user namespace of the
// user's containers, conmon, and the cleanup podman conmon starts when a
// container exits. A stage ends them with what else is left (Podman starts
// a new pause process next time; a concurrent job's container keeps its
// own namespace alive), without naming them in the job log. Nothing of the
// script can be among them: what it leaves in the container dies with the
// container's PID namespace.
func (r *Runtime) HelperProcesses() []string { return []string{"catatonit", "conmon", "podman"} }

// New returns the runtime for the job user, who runs ci-exec (uid is the
// process's own). hostEnv is the driver's own environment, consulted only
// for proxy and CA settings of pulls.
func New(cfg config.Mechanism, user config.UserInfo, hostEnv map[string]string, grace time.Duration, uid int) *Runtime {
	r := &Runtime{Base: kit.NewBase(Name, cfg, user, hostEnv, grace, ".podman"), uid: uid}
	r.EntrySize = recordSize
	return r
}

// The user's Podman storage (under Storage, 0700): graph root and the XDG
// dirs Podman would otherwise take from the user's home.
func (r *Runtime) graphRoot() string { return filepath.Join(r.Storage, "root") }
func (r *Runtime) xdgConfig() string { return filepath.Join(r.Storage, "config") }
func (r *Runtime) xdgData() string   { return filepath.Join(r.Storage, "data") }

// runDir holds podman's run root and XDG_RUNTIME_DIR (its locks, sockets,
// the rootless pause process's pid file): Podman 4.3 refuses a run root
// longer than 50 characters (its sockets' paths are short), so it is
// /tmp/ci-exec-podman-UID-HASH, one per user and storage (a run root
// belongs to one graph root), 0700 and checked to be the user's own. /tmp
// is emptied at boot, which is what Podman expects of a run root.
func (r *Runtime) runDir() string { return RunDir(r.Storage, r.uid) }

// RunDir is the run dir of the Podman storage in storage (the user's
// <image_storage_dir>/<user>.podman) for uid.
func RunDir(storage string, uid int) string {
	h := sha256.Sum256([]byte(storage))
	return fmt.Sprintf("/tmp/ci-exec-podman-%d-%s", uid, hex.EncodeToString(h[:4]))
}
func (r *Runtime) runRoot() string    { return filepath.Join(r.runDir(), "run") }
func (r *Runtime) xdgRuntime() string { return filepath.Join(r.runDir(), "xdg") }

// tmpDir is TMPDIR for pulls (layer downloads): under the admin's tmp_dir
// (per user), else inside the storage.
func (r *Runtime) tmpDir() string {
	if r.Cfg.TmpDir == "" {
		return filepath.Join(r.Storage, "tmp")
	}
	return filepath.Join(r.Cfg.TmpDir, r.User.Name)
}

func (r *Runtime) Name() string             { return Name }
func (r *Runtime) UserArgsVariable() string { return "JACAMAR_CI_PODMAN_ARGS" }

// credentialVariables are the user's registry variables. Podman reads no
// credential variables itself; ci-exec writes them to the pull's authfile.
var credentialVariables = auth.VariableNames{Username: "PODMAN_REGISTRY_USERNAME", Password: "PODMAN_REGISTRY_PASSWORD"}

func (r *Runtime) CredentialVariables() auth.VariableNames { return credentialVariables }

// PrepEnv tells prep_script where the user's Podman storage is.
func (r *Runtime) PrepEnv() []string { return []string{"CI_EXEC_PODMAN_STORAGE=" + r.Storage} }

// rootless reports whether podman runs as an unprivileged user.
func (r *Runtime) rootless() bool { return r.uid != 0 }

// globalArgs come first in every podman command: the user's own storage
// (the overlay driver: native in a user namespace on current kernels, or
// the mount_program of storage.conf), and only podman's errors on stderr
// (its warnings, such as "/" not being a shared mount, mean nothing to a
// job).
func (r *Runtime) globalArgs(info mechanism.Info) []string {
	return []string{info.Program("podman"), "--root", r.graphRoot(), "--runroot", r.runRoot(),
		"--storage-driver", "overlay", "--log-level", "error"}
}

// baseEnv is podman's own environment (see package comment).
func (r *Runtime) baseEnv() []string {
	return []string{"PATH=" + r.ToolPath(toolPath), "HOME=" + r.User.Home, "USER=" + r.User.Name, "LOGNAME=" + r.User.Name,
		"LANG=C.UTF-8", "XDG_RUNTIME_DIR=" + r.xdgRuntime(), "XDG_CONFIG_HOME=" + r.xdgConfig(), "XDG_DATA_HOME=" + r.xdgData(),
		"TMPDIR=" + r.tmpDir()}
}

// toolEnv is the environment of podman pull: baseEnv plus the driver's
// network settings (kit.ToolEnv), without any credential (those go in the
// authfile).
func (r *Runtime) toolEnv() []string {
	base := r.baseEnv()
	return kit.ToolEnv(r.User, r.ToolPath(toolPath), base[5:], r.HostEnv, false, auth.Credential{}, credentialVariables)
}

// RunFlags is `podman run`'s option table (4.3.1, `podman run --help`).
// Podman parses with pflag: long flags in full (no abbreviations), a
// switch also as --flag=true|false.
func (r *Runtime) RunFlags() policy.FlagTable { return runFlags }

// DefaultUserArgs are the run flags users may pass unless the admin lists
// others: environment settings, limits that only take resources away, an
// init, a read-only image with tmpfs scratch, the container's hostname,
// time zone and umask. None of them mounts host paths (--tmpfs mounts an
// empty tmpfs), changes identity, namespaces, capabilities or devices,
// reaches a registry, or picks another image. Not --annotation: the OCI
// runtime reads some (run.oci.* in crun) as settings.
func (r *Runtime) DefaultUserArgs() []string {
	return []string{"--env", "--tmpfs", "--read-only", "--read-only-tmpfs", "--cpus", "--cpu-shares", "--memory",
		"--memory-reservation", "--memory-swap", "--pids-limit", "--shm-size", "--tz", "--umask", "--hostname",
		"--ulimit", "--stop-timeout", "--unsetenv", "--unsetenv-all", "--label"}
}
