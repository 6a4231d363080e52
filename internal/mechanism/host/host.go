// Package host is the Runtime for stages that run on the host: no image,
// no pull, the admin's bash running the stage script with the job's host
// environment. It exists so that the stages treat every placement alike
// (plan, run, classify) instead of special-casing "no container".
package host

import (
	"context"
	"errors"
	"fmt"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/policy"
)

// Name is what the job log calls it.
const Name = "host"

// Runtime runs stage scripts with bash on the host.
type Runtime struct {
	// Shell is the bash that runs scripts (general.shell_path; default
	// /bin/bash).
	Shell string
	// Login runs `bash --login` (general.login_shell) instead of a shell
	// that reads no start-up files.
	Login bool
}

var _ mechanism.Runtime = Runtime{}

// New returns the host runtime for the admin's shell settings.
func New(shell string, login bool) Runtime {
	if shell == "" {
		shell = "/bin/bash"
	}
	return Runtime{Shell: shell, Login: login}
}

func (Runtime) Name() string                                           { return Name }
func (Runtime) UserArgsVariable() string                               { return "" }
func (Runtime) CredentialVariables() auth.VariableNames                { return auth.VariableNames{} }
func (Runtime) RunFlags() policy.FlagTable                             { return nil }
func (Runtime) DefaultUserArgs() []string                              { return nil }
func (Runtime) Diagnose(int, string) string                            { return "" }
func (Runtime) CheckImage(mechanism.Image, string) error               { return nil }
func (Runtime) Release(context.Context, mechanism.Image, string) error { return nil }

// Probe reports the shell; there is nothing to start.
func (r Runtime) Probe(context.Context) (mechanism.Info, error) {
	return mechanism.Info{Programs: map[string]string{"bash": r.Shell}}, nil
}

// Pull is refused: the host runs no images.
func (Runtime) Pull(context.Context, mechanism.PullRequest) (mechanism.Image, error) {
	return mechanism.Image{}, errors.New("the host runs no images")
}

// Command runs the last word of spec.Argv (the stage script) with the
// admin's bash, in spec.Env alone. It is pure.
func (r Runtime) Command(spec mechanism.RunSpec) (argv, env []string, err error) {
	if len(spec.Argv) == 0 {
		return nil, nil, fmt.Errorf("no script to run")
	}
	script := spec.Argv[len(spec.Argv)-1]
	if r.Login {
		argv = []string{r.Shell, "--login", script}
	} else {
		argv = []string{r.Shell, "--noprofile", "--norc", script}
	}
	return argv, append([]string(nil), spec.Env...), nil
}
