// Package charliecloud runs job stages in Charliecloud containers (seed 004):
// ch-image pulls into per-user storage, ch-convert makes SquashFS files for
// batch jobs, ch-run runs the stage scripts.
//
// Charliecloud 0.31 (Debian 12) shapes most of this; the facts are in
// docs/charliecloud.md:
//
//   - ch-run has no --write-fake, and a bind's destination must already
//     exist in the (read-only) image. Each job therefore gets its own copy
//     of the pulled image in the storage, made of hard links (cheap, and
//     immune to a concurrent re-pull replacing the original), and the bind
//     mount points are created inside that copy, never through a symlink of
//     the image. The copy runs by name (ch-run -s STORAGE NAME), or is
//     converted to SquashFS with the mount points already inside.
//   - ch-image must run with the system python (PATH starting /usr/sbin:
//     /usr/bin), $USER set, the build cache disabled (it needs a git
//     identity) and stdin closed (it prompts for credentials otherwise);
//     credentials work only with --auth and travel only in its environment.
//   - one storage directory admits one ch-image at a time: a busy storage
//     is waited for, not failed.
//   - ch-run passes the whole host environment into the container: the
//     driver gives it a clean, explicit one.
package charliecloud

import (
	"strings"
	"time"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/mechanism/kit"
	"github.com/ci-exec/ci-exec/internal/policy"
)

// Name is the run_mechanism value.
const Name = config.MechanismCharliecloud

// jobImageRepo is the storage name prefix of per-job image copies; Release
// removes nothing else.
const jobImageRepo = "ci-exec-job"

// toolPath is the PATH of ch-image and ch-convert: the system python first,
// because a pyenv or venv python3 lacks Charliecloud's modules (lark) and
// ch-image starts with "#!/usr/bin/env python3".
const toolPath = "/usr/sbin:/usr/bin:/sbin:/bin"

// Runtime is the Charliecloud mechanism for one job user.
type Runtime struct {
	kit.Base
}

var _ mechanism.Runtime = (*Runtime)(nil)
var _ mechanism.PrepEnver = (*Runtime)(nil)

// New returns the runtime for the job user. hostEnv is the driver's own
// environment (without CUSTOM_ENV_), consulted only for proxy and CA
// settings that ch-image's downloads need.
func New(cfg config.Mechanism, user config.UserInfo, hostEnv map[string]string, grace time.Duration) *Runtime {
	return &Runtime{Base: kit.NewBase(Name, cfg, user, hostEnv, grace, ".ch")}
}

func (r *Runtime) Name() string             { return Name }
func (r *Runtime) UserArgsVariable() string { return "JACAMAR_CI_CHARLIECLOUD_ARGS" }

// credentialVariables are the user's registry variables: ch-image's own.
var credentialVariables = auth.VariableNames{Username: "CH_IMAGE_USERNAME", Password: "CH_IMAGE_PASSWORD"}

func (r *Runtime) CredentialVariables() auth.VariableNames { return credentialVariables }

// PrepEnv tells prep_script where the user's image storage is.
func (r *Runtime) PrepEnv() []string { return []string{"CH_IMAGE_STORAGE=" + r.Storage} }

// RunFlags is ch-run's option table (0.31 plus the newer --write-fake,
// --seccomp and friends, so that they are recognised and refused rather
// than taken for the image name).
func (r *Runtime) RunFlags() policy.FlagTable { return runFlags }

var runFlags = policy.FlagTable{
	{Long: "--bind", Short: "-b", Arg: policy.RequiredArg},
	{Long: "--ch-ssh", Arg: policy.NoArg},
	{Long: "--cd", Short: "-c", Arg: policy.RequiredArg},
	{Long: "--env-no-expand", Arg: policy.NoArg},
	{Long: "--feature", Arg: policy.RequiredArg},
	{Long: "--gid", Short: "-g", Arg: policy.RequiredArg},
	{Long: "--home", Arg: policy.NoArg},
	{Long: "--join-ct", Arg: policy.RequiredArg},
	{Long: "--join-pid", Arg: policy.RequiredArg},
	{Long: "--join-tag", Arg: policy.RequiredArg},
	{Long: "--join", Short: "-j", Arg: policy.NoArg},
	{Long: "--mount", Short: "-m", Arg: policy.RequiredArg},
	{Long: "--no-home", Arg: policy.NoArg},
	{Long: "--no-passwd", Arg: policy.NoArg},
	{Long: "--set-env", Arg: policy.OptionalArg},
	{Long: "--storage", Short: "-s", Arg: policy.RequiredArg},
	{Long: "--private-tmp", Short: "-t", Arg: policy.NoArg},
	{Long: "--unsafe", Arg: policy.NoArg},
	{Long: "--unset-env", Arg: policy.RequiredArg},
	{Long: "--uid", Short: "-u", Arg: policy.RequiredArg},
	{Long: "--verbose", Short: "-v", Arg: policy.NoArg},
	{Long: "--quiet", Short: "-q", Arg: policy.NoArg},
	{Long: "--write", Short: "-w", Arg: policy.NoArg},
	{Long: "--write-fake", Short: "-W", Arg: policy.NoArg},
	{Long: "--seccomp", Arg: policy.NoArg},
	{Long: "--test", Arg: policy.RequiredArg},
	{Long: "--help", Short: "-?", Arg: policy.NoArg},
	{Long: "--usage", Arg: policy.NoArg},
	{Long: "--version", Short: "-V", Arg: policy.NoArg},
}

// DefaultUserArgs are the ch-run flags users may pass unless the admin
// lists others: environment settings, a private /tmp, skipping the
// passwd/group binds, verbosity and the start directory. None of them
// mounts, writes, changes identity, picks another storage or image, or
// leaves the container early.
func (r *Runtime) DefaultUserArgs() []string {
	return []string{"--set-env", "--env-no-expand", "--private-tmp", "--no-passwd", "--verbose", "--cd"}
}

// writeFlag is ch-run's option that mounts the image read-write.
const writeFlag = "--write"

// mayWriteImage reports whether a run command of this configuration can
// mount the image read-write: the admin's custom_options or runner_options
// have -w, or users may pass it (allowed_user_args, unless
// disable_user_args). It reads the configuration only, so nothing a job
// controls can make it false for a job that writes.
func (r *Runtime) mayWriteImage() bool {
	if hasFlag(r.Cfg.CustomOptions, writeFlag) || hasFlag(r.Cfg.RunnerOptions, writeFlag) {
		return true
	}
	if r.Cfg.DisableUserArgs {
		return false
	}
	allowed := r.Cfg.AllowedUserArgs
	if len(allowed) == 0 {
		allowed = r.DefaultUserArgs()
	}
	for _, a := range allowed {
		if c, ok := runFlags.Canonical(a); ok && c == writeFlag {
			return true
		}
	}
	return false
}

// hasFlag reports whether args, read as ch-run reads its options (values
// of options that take one are skipped; "-tw" is -t and -w), have flag
// (canonical long name). A word it cannot read counts as having it: only
// the admin's trusted options get here, and a wrong "yes" costs a copy.
func hasFlag(args []string, flag string) bool {
	for i := 0; i < len(args); i++ {
		w := args[i]
		switch {
		case w == "--":
			return false
		case strings.HasPrefix(w, "--"):
			name, _, hasValue := strings.Cut(w, "=")
			f, ok := lookupFlag(name)
			if !ok {
				return true
			}
			if f.Long == flag {
				return true
			}
			if f.Arg == policy.RequiredArg && !hasValue {
				i++
			}
		case strings.HasPrefix(w, "-") && len(w) > 1:
			for j := 1; j < len(w); j++ {
				f, ok := lookupFlag("-" + string(w[j]))
				if !ok {
					return true
				}
				if f.Long == flag {
					return true
				}
				if f.Arg == policy.RequiredArg {
					if j == len(w)-1 {
						i++
					}
					break
				}
			}
		}
	}
	return false
}

// lookupFlag finds a ch-run option by its long or short name.
func lookupFlag(name string) (policy.Flag, bool) {
	for _, f := range runFlags {
		if f.Long == name || f.Short == name {
			return f, true
		}
	}
	return policy.Flag{}, false
}

// toolEnv is the environment of ch-image and ch-convert (see
// kit.ToolEnv).
func (r *Runtime) toolEnv(cred auth.Credential, insecure bool) []string {
	path := r.ToolPath(toolPath)
	settings := []string{
		// The build cache needs a git identity and brings nothing to pulls.
		"CH_IMAGE_CACHE=disabled",
		// ch-convert has no -s option: it asks ch-image, which reads this.
		"CH_IMAGE_STORAGE=" + r.Storage,
	}
	return kit.ToolEnv(r.User, path, settings, r.HostEnv, insecure, cred, credentialVariables)
}
