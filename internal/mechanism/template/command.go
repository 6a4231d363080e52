package template

import (
	"errors"
	"fmt"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"

	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/mechanism/kit"
)

// Command expands the run template for one stage. It is pure.
//
// The lists: {binds} is the bind fragment per bind (bind_ro for a
// read-only one), {env} the env_name fragment per container variable,
// whose value goes in the command's environment, {admin_options} and
// {user_args} the words as the policy admitted them, {command} the stage
// command (the image's shell behind the start signal), {rootless} the
// rootless fragment unless the job user is root.
func (r *Runtime) Command(spec mechanism.RunSpec) (argv, env []string, err error) {
	if err := kit.CheckSpec(spec); err != nil {
		return nil, nil, err
	}
	key, err := jobKeyOf(spec.Image.Lease)
	if err != nil {
		return nil, nil, err
	}
	scalars := r.common()
	for k, v := range imageScalars(spec.Image.Ref, spec.Image.Digest, spec.Image.Handle, key) {
		scalars[k] = v
	}
	scalars["workdir"], scalars["shell"] = spec.Workdir, spec.Image.Shell
	binds, err := r.binds(scalars, spec)
	if err != nil {
		return nil, nil, err
	}
	envArgs, env, err := r.execEnv(scalars, spec.Env)
	if err != nil {
		return nil, nil, err
	}
	v := values{scalars: scalars, lists: map[string][]string{
		"binds": binds, "env": envArgs, "admin_options": spec.AdminOptions, "user_args": spec.UserArgs,
		"command": spec.Argv, "rootless": r.rootless(),
	}}
	argv, err = r.argv(spec.Info, r.t.Run, v)
	if err != nil {
		return nil, nil, fmt.Errorf("runtimes.%s.run: %w", r.name, err)
	}
	return argv, env, nil
}

func (r *Runtime) binds(common map[string]string, spec mechanism.RunSpec) ([]string, error) {
	var out []string
	for _, b := range spec.Binds {
		frag := r.t.Bind
		if b.ReadOnly {
			frag = r.t.BindRO
		}
		if len(frag) == 0 {
			return nil, fmt.Errorf("cannot bind %s:%s read-only: runtimes.%s has no bind_ro fragment", b.Src, b.Dst, r.name)
		}
		// A runtime's bind syntax (SRC:DST[:ro]) cannot escape its own
		// separators: a path with one would mount something else.
		if strings.ContainsAny(b.Src, ":,") || strings.ContainsAny(b.Dst, ":,") {
			return nil, fmt.Errorf("cannot bind %s:%s: a path containing ':' or ',' cannot be passed to a bind option safely", b.Src, b.Dst)
		}
		words, err := fragment(frag, common, []map[string]string{{"src": b.Src, "dst": b.Dst}})
		if err != nil {
			return nil, fmt.Errorf("runtimes.%s.bind: %w", r.name, err)
		}
		out = append(out, words...)
	}
	return out, nil
}

var envName = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`) })

// execEnv is the run command's environment (baseEnv plus the container's
// values) and the {env} words that pass the variables on by name. A
// variable the command's own environment sets to another value (HOME,
// PATH: paths, not secrets) can only go as NAME=VALUE, with the env_value
// fragment; without one it is an error, never a silent wrong value.
func (r *Runtime) execEnv(common map[string]string, containerEnv []string) (args, env []string, err error) {
	env, err = r.baseEnv()
	if err != nil {
		return nil, nil, err
	}
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
		if slices.Contains(r.t.ImageEnv, k) {
			continue
		}
		var words []string
		switch ov, mine := own[k]; {
		case mine && ov == v:
			words, err = fragment(r.t.EnvName, common, []map[string]string{{"name": k}})
		case mine:
			if len(r.t.EnvValue) == 0 {
				return nil, nil, fmt.Errorf("cannot pass %s to the container: the runtime's own environment sets it to %q; define runtimes.%s.env_value", k, ov, r.name)
			}
			words, err = fragment(r.t.EnvValue, common, []map[string]string{{"name": k, "value": v}})
		default:
			env = append(env, kv)
			words, err = fragment(r.t.EnvName, common, []map[string]string{{"name": k}})
		}
		if err != nil {
			return nil, nil, fmt.Errorf("runtimes.%s.env_name: %w", r.name, err)
		}
		args = append(args, words...)
	}
	return args, env, nil
}

// jobKeyRE matches the job part of a lease (PullRequest.JobKey).
var jobKeyRE = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,100}$`) })

// jobKeyOf is {job_key}: the job's key for an image, from the lease Pull
// took (refs/KEY/JOBKEY), the same in every stage and at cleanup.
func jobKeyOf(lease string) (string, error) {
	if lease == "" {
		return "", errors.New("the image has no lease (prepare takes one)")
	}
	k := filepath.Base(lease)
	if !jobKeyRE().MatchString(k) {
		return "", fmt.Errorf("the image's lease %s names no job", lease)
	}
	return k, nil
}
