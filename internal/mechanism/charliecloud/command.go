package charliecloud

import (
	"errors"
	"fmt"
	"regexp"
	"strings"
	"sync"

	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/mechanism/kit"
	"github.com/ci-exec/ci-exec/internal/policy"
)

// Command builds the ch-run command line for one stage. It is pure.
//
//	ch-run [-s STORAGE] [--write-fake] --bind=SRC:DST... --cd=DIR
//	       [image options] [admin options] [user args] IMAGE -- SHELL SCRIPT
//
// The order makes later options win where ch-run lets them (admin over the
// image's environment, the user's checked arguments last), and "--" ends
// option parsing, so nothing after the image is ever read as an option.
// The environment is given whole: ch-run passes its own environment into
// the container, so this list is exactly what the container sees (plus the
// image's ENV with --set-env and ch-run's CH_RUNNING).
func (r *Runtime) Command(spec mechanism.RunSpec) (argv, env []string, err error) {
	if err := kit.CheckSpec(spec); err != nil {
		if spec.Service && spec.ImageEntrypoint && len(spec.Argv) == 0 {
			// ch-run has no notion of an image's ENTRYPOINT or CMD.
			return nil, nil, errors.New("ch-run cannot run an image's own entrypoint and command: the service needs an entrypoint or command")
		}
		return nil, nil, err
	}
	argv = []string{spec.Info.Program("ch-run")}
	if spec.Image.Format == FormatStorage {
		argv = append(argv, "-s", r.Storage)
	}
	if spec.Info.Features[FeatureWriteFake] {
		// A writable tmpfs over the image: jobs may write outside the binds
		// (package installs), changes vanish with the container.
		argv = append(argv, "--write-fake")
	}
	for _, b := range spec.Binds {
		if strings.Contains(b.Src, ":") || strings.Contains(b.Dst, ":") {
			return nil, nil, fmt.Errorf("cannot bind %s:%s: ch-run's --bind cannot express a path containing ':'", b.Src, b.Dst)
		}
		if b.ReadOnly {
			return nil, nil, fmt.Errorf("cannot bind %s read-only: ch-run has no read-only binds", b.Src)
		}
		argv = append(argv, "--bind="+b.Src+":"+b.Dst)
	}
	if !bindsAt(spec.Binds, "/tmp") {
		// Without it ch-run binds the host's /tmp (other jobs' and users'
		// files); with a bind at /tmp (the view's skeleton) the container
		// has a private /tmp already.
		argv = append(argv, "--private-tmp")
	}
	if spec.Workdir != "" {
		argv = append(argv, "--cd="+spec.Workdir)
	}
	argv = append(argv, spec.Image.RunOptions...)
	argv = append(argv, spec.AdminOptions...)
	argv = append(argv, spec.UserArgs...)
	argv = append(argv, spec.Image.Handle, "--")
	argv = append(argv, spec.Argv...)
	env = append([]string(nil), spec.Env...)
	if !hasKey(env, "USER") {
		// ch-run refuses to start without $USER.
		return nil, nil, errors.New("the container environment has no USER (ch-run needs it)")
	}
	return argv, env, nil
}

func hasKey(env []string, key string) bool {
	for _, kv := range env {
		if strings.HasPrefix(kv, key+"=") {
			return true
		}
	}
	return false
}

// chRunError matches ch-run's own error lines: "ch-run[1234]: error: can't
// mkdir: ... (ch_misc.c:409 30)". After ch-run has started the stage's
// shell nothing of ch-run is left to print one, so such a line with exit
// code 1 means ch-run itself failed, not the script.
var chRunError = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`(?m)^ch-run\[[0-9]+\]: error: .*$`) })

// Diagnose returns ch-run's error line when ch-run failed before running
// the stage's script.
func (r *Runtime) Diagnose(exitCode int, stderrTail string) string {
	if exitCode != 1 {
		return ""
	}
	m := chRunError().FindAllString(stderrTail, -1)
	if len(m) == 0 {
		return ""
	}
	return strings.TrimSpace(m[len(m)-1])
}

// bindsAt reports whether a bind's destination is dst.
func bindsAt(binds []policy.Bind, dst string) bool {
	for _, b := range binds {
		if b.Dst == dst {
			return true
		}
	}
	return false
}
