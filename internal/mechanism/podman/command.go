package podman

import (
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"sync"

	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/mechanism/kit"
	"github.com/ci-exec/ci-exec/internal/outcome"
)

// Command builds the podman run command line for one stage. It is pure.
//
//	podman --root R --runroot RR --storage-driver overlay --log-level error
//	       run --rm --replace --name ci-exec-JOBKEY --pull never --network host
//	       --log-driver none --http-proxy=false --security-opt no-new-privileges
//	       --init --preserve-fds 1 [--userns keep-id] --workdir DIR
//	       --volume SRC:DST[:ro]... --env NAME... --entrypoint EP
//	       [admin options] [user args] IMAGE-ID SHELL -c ... SCRIPT
//
// Podman stops reading its own options at the image, so nothing after it
// is ever read as an option; the image is named by its ID, exactly what
// prepare pulled. The container's variables are passed by name: their
// values are in podman's environment (env), never on its command line,
// except the few names podman itself uses with another value (HOME,
// TMPDIR, XDG_*...: paths, not secrets), which go as --env NAME=VALUE.
// PATH is left to the image (its ENV) and podman's default.
//
// --network host: the job reaches what the host reaches (the registry,
// the GitLab server), as under the other runtimes, without slirp4netns.
// --log-driver none: no copy of the job's output (secrets a script
// prints) in Podman's storage; the attached output still reaches the
// runner. --init: a PID 1 that forwards signals and reaps, so the shell
// is not PID 1 (which ignores signals it has no handler for) and a killed
// script ends with 128+N. --preserve-fds 1: the start signal's fd
// (outcome.StartFD).
func (r *Runtime) Command(spec mechanism.RunSpec) (argv, env []string, err error) {
	if err := kit.CheckSpec(spec); err != nil {
		return nil, nil, err
	}
	name, err := containerName(spec.Image.Lease)
	if err != nil {
		return nil, nil, err
	}
	argv = append(r.globalArgs(spec.Info), "run", "--rm", "--replace", "--name", name, "--pull", "never",
		"--network", "host", "--http-proxy=false", "--security-opt", "no-new-privileges")
	if spec.Info.Features[FeatureLogDriverNone] {
		argv = append(argv, "--log-driver", "none")
	}
	if spec.Info.Features[FeatureInit] {
		argv = append(argv, "--init")
	}
	argv = append(argv, "--preserve-fds", fmt.Sprint(outcome.StartFD-2))
	if r.rootless() {
		// The user's uid and gid inside are theirs outside: files the job
		// writes to its dirs belong to the user.
		argv = append(argv, "--userns", "keep-id")
	}
	if spec.Workdir != "" {
		argv = append(argv, "--workdir", spec.Workdir)
	}
	for _, b := range spec.Binds {
		// --volume splits on ":" and cannot escape it; "," starts options.
		if strings.ContainsAny(b.Src, ":,") || strings.ContainsAny(b.Dst, ":,") {
			return nil, nil, fmt.Errorf("cannot bind %s:%s: podman's --volume cannot express a path containing ':' or ','", b.Src, b.Dst)
		}
		v := b.Src + ":" + b.Dst
		if b.ReadOnly {
			v += ":ro"
		}
		argv = append(argv, "--volume", v)
	}
	envArgs, env, err := r.execEnv(spec.Env)
	if err != nil {
		return nil, nil, err
	}
	argv = append(argv, envArgs...)
	if len(spec.Image.RunOptions) == 0 {
		// Never the image's ENTRYPOINT: the stage command is the whole
		// command, as under the other runtimes.
		argv = append(argv, "--entrypoint", "")
	}
	argv = append(argv, spec.Image.RunOptions...)
	argv = append(argv, spec.AdminOptions...)
	argv = append(argv, spec.UserArgs...)
	argv = append(argv, spec.Image.Handle)
	argv = append(argv, spec.Argv...)
	return argv, env, nil
}

// envName is what podman's --env NAME takes from its environment.
var envName = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`) })

// execEnv is podman's own environment plus the container's values, and
// the --env options that pass them on.
func (r *Runtime) execEnv(containerEnv []string) (args, env []string, err error) {
	env = r.baseEnv()
	own := map[string]string{}
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		own[k] = v
	}
	for _, kv := range containerEnv {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || !envName().MatchString(k) {
			return nil, nil, fmt.Errorf("cannot pass %q to the container: not NAME=VALUE", k)
		}
		switch ov, mine := own[k]; {
		case k == "PATH":
			continue
		case mine && ov == v:
			args = append(args, "--env", k)
		case mine:
			args = append(args, "--env", k+"="+v)
		default:
			env = append(env, kv)
			args = append(args, "--env", k)
		}
	}
	return args, env, nil
}

// jobKey matches the job part of a lease (PullRequest.JobKey).
var jobKey = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,100}$`) })

// containerName is the job's container for an image: ci-exec-<job key>,
// from the lease Pull took (refs/KEY/JOBKEY), the same in every stage and
// at cleanup.
func containerName(lease string) (string, error) {
	if lease == "" {
		return "", errors.New("the image has no lease (prepare takes one)")
	}
	k := filepath.Base(lease)
	if !jobKey().MatchString(k) {
		return "", fmt.Errorf("the image's lease %s names no job", lease)
	}
	return "ci-exec-" + k, nil
}

// entryPointOptions is the run option that sets an admin's entry point
// (runner_entry_point, user_entry_point), as JSON: podman takes a JSON
// array as the exact argv, with no shell splitting.
func entryPointOptions(words []string) []string {
	if len(words) == 0 {
		return nil
	}
	j, _ := json.Marshal(words)
	return []string{"--entrypoint", string(j)}
}

// Diagnose returns podman's own error line when podman failed before
// running the stage's script: it exits 125 for its own errors, 126 when
// the command cannot be invoked and 127 when it is not found.
func (r *Runtime) Diagnose(exitCode int, stderrTail string) string {
	if exitCode < 125 || exitCode > 127 {
		return ""
	}
	return kit.LastLine(stderrTail, "Error:")
}
