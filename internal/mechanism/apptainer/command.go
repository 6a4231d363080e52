package apptainer

import (
	"fmt"
	"strings"

	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/mechanism/kit"
)

// Command builds the apptainer exec command line for one stage. It is pure.
//
//	apptainer exec --cleanenv --contain --pid --no-privs --bind=SRC:DST[:ro]... --pwd=DIR
//	          [image options] [admin options] [user args] SIF SHELL SCRIPT
//
// Apptainer stops reading its own options at the image, so nothing after
// it is ever read as an option. --cleanenv drops the host environment; the
// container gets the variables in spec.Env as APPTAINERENV_ settings in
// apptainer's own, explicit environment (never on the command line).
func (r *Runtime) Command(spec mechanism.RunSpec) (argv, env []string, err error) {
	sub := "exec"
	switch {
	case spec.Service && spec.ImageEntrypoint:
		// The image's runscript is its ENTRYPOINT with the arguments (or
		// its CMD without any), as Docker starts a service.
		sub = "run"
		if spec.Image.Handle == "" {
			return nil, nil, fmt.Errorf("no image")
		}
	default:
		if err := kit.CheckSpec(spec); err != nil {
			return nil, nil, err
		}
	}
	// --contain: no host $HOME, /tmp or /var/tmp (Apptainer binds them by
	// default, and with them the runner account's files); the container
	// gets empty private ones and sees only the binds below. --pid: its own
	// /proc, so no host process's /proc/PID/root leads back to the host's
	// files (a root runner's Apptainer uses no user namespace, and root
	// could walk them), and whatever the stage leaves running dies with it.
	// --no-privs: a root job's container root has no capabilities (by
	// default Apptainer gives it all of root's); for other users a no-op.
	argv = []string{spec.Info.Program("apptainer"), sub, "--cleanenv", "--contain", "--pid", "--no-privs"}
	for _, b := range spec.Binds {
		// --bind splits on "," and ":"; neither can be escaped.
		if strings.ContainsAny(b.Src, ":,") || strings.ContainsAny(b.Dst, ":,") {
			return nil, nil, fmt.Errorf("cannot bind %s:%s: apptainer's --bind cannot express a path containing ':' or ','", b.Src, b.Dst)
		}
		bind := b.Src + ":" + b.Dst
		if b.ReadOnly {
			bind += ":ro"
		}
		argv = append(argv, "--bind="+bind)
	}
	if spec.Workdir != "" {
		argv = append(argv, "--pwd="+spec.Workdir)
	}
	if spec.GPU {
		// The host's NVIDIA driver libraries and devices (nvidia-container-cli
		// or apptainer's own list in nvliblist.conf).
		argv = append(argv, "--nv")
	}
	if spec.Limits.CPUs > 0 {
		argv = append(argv, fmt.Sprintf("--cpus=%d", spec.Limits.CPUs))
	}
	if spec.Limits.MemoryBytes > 0 {
		argv = append(argv, fmt.Sprintf("--memory=%d", spec.Limits.MemoryBytes))
	}
	argv = append(argv, spec.Image.RunOptions...)
	argv = append(argv, spec.AdminOptions...)
	argv = append(argv, spec.UserArgs...)
	argv = append(argv, spec.Image.Handle)
	argv = append(argv, spec.Argv...)
	return argv, r.execEnv(spec.Env), nil
}

// execEnv is apptainer's own environment: what it needs to run, plus the
// container's variables as APPTAINERENV_. HOME is apptainer's to set (it
// refuses APPTAINERENV_HOME), and PATH is left to the image (its ENV
// settings) and apptainer's default: a host PATH means nothing inside.
func (r *Runtime) execEnv(containerEnv []string) []string {
	env := []string{"PATH=" + r.ToolPath(toolPath), "HOME=" + r.User.Home, "USER=" + r.User.Name, "LOGNAME=" + r.User.Name, "LANG=C.UTF-8"}
	for _, kv := range containerEnv {
		k, _, _ := strings.Cut(kv, "=")
		if k == "HOME" || k == "PATH" {
			continue
		}
		env = append(env, "APPTAINERENV_"+kv)
	}
	return env
}

// Diagnose returns apptainer's own FATAL line when apptainer failed before
// running the stage's script (it then exits 255).
func (r *Runtime) Diagnose(exitCode int, stderrTail string) string {
	if exitCode != 255 {
		return ""
	}
	return kit.LastLine(stderrTail, "FATAL:")
}
