// Package template is the admin-defined run mechanism (seed 003: OpenJD's
// wrap actions): a [runtimes.NAME] table describes a container runtime as
// argv templates (check or pull an image, set up a job, run a stage, tear
// the job down, remove an evicted image) with named placeholders, and
// run_mechanism = "template:NAME" selects it. It is a mechanism.Runtime
// like the built-ins, so the stages apply the same allowlist, placement,
// volume, user-argument and environment policy to it; only the command
// lines come from the admin.
//
// Values reach the runtime as argv words (a list placeholder such as
// {binds} becomes several words), never through a shell. The container's
// variables go by name ({name} in env_name), their values in the command's
// environment. Registry credentials never reach an argv: they are in a
// per-job 0600 file ({authfile} in the auth fragment) or in the pull's
// environment (username_env, password_env).
//
// The store (package imagecache) keeps one entry per digest: the image
// file pull wrote to {image_file}, or a record naming the image in the
// runtime's own storage (REPO@DIGEST), so concurrent jobs pull once,
// leases keep an image while a job uses it, and eviction runs remove.
package template

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/mechanism/kit"
	"github.com/ci-exec/ci-exec/internal/policy"
)

// Runtime is one template runtime for one job user.
type Runtime struct {
	kit.Base
	name string
	t    *config.Template
	uid  int
}

var _ mechanism.Runtime = (*Runtime)(nil)
var _ mechanism.Evicter = (*Runtime)(nil)
var _ mechanism.Helpers = (*Runtime)(nil)
var _ mechanism.PrepEnver = (*Runtime)(nil)

// New returns the template runtime name (a [runtimes] table) for the job
// user, who runs ci-exec with uid. cfg is the template's policy keys as
// the stage adjusted them (image_storage_dir of a batch executor).
func New(name string, t *config.Template, cfg config.Mechanism, user config.UserInfo, hostEnv map[string]string, grace time.Duration, uid int) *Runtime {
	return &Runtime{Base: kit.NewBase("template-"+name, cfg, user, hostEnv, grace, ".tpl-"+name), name: name, t: t, uid: uid}
}

// Name is the run_mechanism value ("template:podman").
func (r *Runtime) Name() string { return config.TemplatePrefix + r.name }

func (r *Runtime) UserArgsVariable() string { return r.t.UserArgsVariable }

func (r *Runtime) CredentialVariables() auth.VariableNames {
	return auth.VariableNames{Username: r.t.UsernameVariable, Password: r.t.PasswordVariable}
}

// RunFlags is the admin's user_flags: a template has no built-in flag
// table, so users may pass exactly the flags the admin describes (and
// allowed_user_args may narrow them); anything else is refused.
func (r *Runtime) RunFlags() policy.FlagTable { return FlagTable(r.t.UserFlags) }

// DefaultUserArgs are all of user_flags.
func (r *Runtime) DefaultUserArgs() []string {
	var out []string
	for _, f := range FlagTable(r.t.UserFlags) {
		if f.Long != "" {
			out = append(out, f.Long)
		} else {
			out = append(out, f.Short)
		}
	}
	return out
}

// FlagTable reads user_flags entries ("-e/--env=", "--read-only",
// "--opt[=]"), which config validation has checked.
func FlagTable(specs []string) policy.FlagTable {
	var t policy.FlagTable
	for _, s := range specs {
		f := policy.Flag{Arg: policy.NoArg}
		switch {
		case strings.HasSuffix(s, "[=]"):
			f.Arg, s = policy.OptionalArg, strings.TrimSuffix(s, "[=]")
		case strings.HasSuffix(s, "="):
			f.Arg, s = policy.RequiredArg, strings.TrimSuffix(s, "=")
		}
		short, long, ok := strings.Cut(s, "/")
		if !ok {
			short, long = "", s
		}
		if !strings.HasPrefix(long, "--") {
			short, long = long, ""
		}
		f.Short, f.Long = short, long
		t = append(t, f)
	}
	return t
}

// HelperProcesses are the admin's helper_processes.
func (r *Runtime) HelperProcesses() []string { return r.t.HelperProcesses }

// PrepEnv tells prep_script where the user's storage for this template is.
func (r *Runtime) PrepEnv() []string { return []string{"CI_EXEC_TEMPLATE_STORAGE=" + r.Storage} }

// RunDir is the short per-user dir {run_dir} of a template's storage
// (sockets and run roots want short paths: Podman refuses a run root
// longer than 50 characters): /tmp/ci-exec-tpl-UID-HASH, 0700.
func RunDir(storage string, uid int) string {
	h := sha256.Sum256([]byte(storage))
	return fmt.Sprintf("/tmp/ci-exec-tpl-%d-%s", uid, hex.EncodeToString(h[:4]))
}

func (r *Runtime) runDir() string { return RunDir(r.Storage, r.uid) }

// tmpDir is {tmp_dir}: <tmp_dir>/<user> when the admin set tmp_dir, else
// inside the user's storage.
func (r *Runtime) tmpDir() string {
	if r.Cfg.TmpDir == "" {
		return filepath.Join(r.Storage, "tmp")
	}
	return filepath.Join(r.Cfg.TmpDir, r.User.Name)
}

// common are the scalars every action knows.
func (r *Runtime) common() map[string]string {
	return map[string]string{"storage": r.Storage, "run_dir": r.runDir(), "tmp_dir": r.tmpDir(), "user": r.User.Name,
		"uid": fmt.Sprint(r.uid), "home": r.User.Home}
}

// imageScalars are an image's scalars: {image} is what the run command
// names (a file in the store, or REPO@DIGEST), {ref} the reference pinned
// to the digest, {job_key} the job's per-image key.
func imageScalars(ref, digest, handle, jobKey string) map[string]string {
	s := map[string]string{"digest": digest, "image": handle, "job_key": jobKey}
	if p, err := policy.ParseImage(ref); err == nil {
		s["ref"] = p.AtDigest(digest)
		s["registry"] = p.Registry
		s["repository"] = strings.TrimPrefix(strings.SplitN(s["ref"], "@", 2)[0], p.Registry+"/")
	}
	return s
}

// baseEnv is every action's environment: the user's identity, the tool's
// PATH, and the admin's command_env. Nothing else of the runner's
// environment reaches the runtime.
func (r *Runtime) baseEnv() ([]string, error) {
	settings, err := r.commandEnv()
	if err != nil {
		return nil, err
	}
	env := []string{"PATH=" + r.ToolPath(kit.SystemPath), "HOME=" + r.User.Home, "USER=" + r.User.Name,
		"LOGNAME=" + r.User.Name, "LANG=C.UTF-8"}
	for _, kv := range settings {
		k, v, _ := strings.Cut(kv, "=")
		env = setEnv(env, k, v)
	}
	return env, nil
}

// commandEnv is command_env with its placeholders filled in.
func (r *Runtime) commandEnv() ([]string, error) {
	var out []string
	for _, kv := range r.t.CommandEnv {
		k, v, _ := strings.Cut(kv, "=")
		x, err := expandWord(v, r.common())
		if err != nil {
			return nil, fmt.Errorf("command_env %s: %w", k, err)
		}
		out = append(out, k+"="+x)
	}
	return out, nil
}

func setEnv(env []string, k, v string) []string {
	for i, kv := range env {
		if strings.HasPrefix(kv, k+"=") {
			env[i] = k + "=" + v
			return env
		}
	}
	return append(env, k+"="+v)
}

// programs are the actions' programs: a name is looked up in
// application_path (or the system PATH) by Probe, an absolute path is
// used as it is.
func (r *Runtime) programs() (names, paths []string) {
	seen := map[string]bool{}
	for _, a := range [][]string{r.t.Version, r.t.Check, r.t.Pull, r.t.Setup, r.t.Run, r.t.Teardown, r.t.Remove, r.t.FindShell} {
		if len(a) == 0 || seen[a[0]] {
			continue
		}
		seen[a[0]] = true
		if filepath.IsAbs(a[0]) {
			paths = append(paths, a[0])
		} else {
			names = append(names, a[0])
		}
	}
	sort.Strings(names)
	return names, paths
}

// Probe finds the template's programs and runs its version action, once
// per process.
func (r *Runtime) Probe(ctx context.Context) (mechanism.Info, error) {
	names, _ := r.programs()
	// The shared lookup would name a built-in's table; say which key of
	// the template to fix.
	for _, n := range names {
		if _, err := kit.FindPrograms(r.Name(), r.Cfg.ApplicationPath, []string{n}, nil); err != nil {
			return mechanism.Info{}, failure.Systemf("%s: %s not found in %s; install it or set runtimes.%s.application_path",
				r.Name(), n, strings.Join(kit.ProgramDirs(r.Cfg.ApplicationPath), ":"), r.name)
		}
	}
	return r.Probed(ctx, names, nil, r.probe)
}

func (r *Runtime) probe(ctx context.Context, info mechanism.Info) (mechanism.Info, error) {
	_, paths := r.programs()
	for _, p := range paths {
		fi, err := os.Stat(p)
		if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0 {
			return info, failure.Systemf("%s: %s is not an executable file; install it or fix runtimes.%s", r.Name(), p, r.name)
		}
		info.Programs[p] = p
	}
	info.ReadOnlyBinds = len(r.t.BindRO) > 0
	info.Version = "template"
	if len(r.t.Version) > 0 {
		argv, err := r.argv(info, r.t.Version, values{scalars: r.common()})
		if err != nil {
			return info, failure.Systemf("%s: version: %v", r.Name(), err)
		}
		out, err := r.Query(ctx, r.ToolPath(kit.SystemPath), argv...)
		if err != nil {
			return info, failure.Systemf("%s: %s failed: %v: %s", r.Name(), strings.Join(argv, " "), err, kit.OneLine(out))
		}
		info.Version = kit.OneLine(strings.SplitN(strings.TrimSpace(out), "\n", 2)[0])
	}
	return info, nil
}

// argv expands an action and puts the found program in its first word.
func (r *Runtime) argv(info mechanism.Info, tmpl []string, v values) ([]string, error) {
	argv, err := expand(tmpl, v)
	if err != nil {
		return nil, err
	}
	argv[0] = info.Program(argv[0])
	return argv, nil
}

// rootless is the {rootless} list: the fragment when the user is not root.
func (r *Runtime) rootless() []string {
	if r.uid == 0 {
		return nil
	}
	return r.t.Rootless
}

// Diagnose returns the runtime's own error line when the run command
// exited with one of error_exit_codes.
func (r *Runtime) Diagnose(exitCode int, stderrTail string) string {
	for _, c := range r.t.ErrorExitCodes {
		if c == exitCode {
			return kit.LastLine(stderrTail, r.t.ErrorPrefix)
		}
	}
	return ""
}

// shell is the image's shell for stage scripts without find_shell.
func (r *Runtime) shell() string {
	if r.t.Shell == "" {
		return "/bin/sh"
	}
	return r.t.Shell
}
