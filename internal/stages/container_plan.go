package stages

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/outcome"
	"github.com/ci-exec/ci-exec/internal/policy"
)

// ContainerPath is PATH inside containers unless the image's own
// environment sets one: the host's PATH (pyenv shims, /opt/...) means
// nothing there.
const ContainerPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// containerPlan is how one stage runs under a mechanism.
type containerPlan struct {
	Placement policy.Placement
	// Image is nil when the stage runs on the host; Argv and Env are then
	// empty and the caller builds its host command.
	Image *mechanism.Image
	// Argv and Env run the runtime; Dir is its host working directory.
	Argv []string
	Env  []string
	Dir  string
	// UserArgs is true when the command carries the user's own runtime
	// arguments: a runtime failure may then be the user's doing.
	UserArgs bool
}

// containerCommand places stage and, for a container, builds its command.
//
// Nothing here comes from a file the job could have written: placement,
// volumes, user arguments and the runtime's programs are recomputed from
// the config and the job's variables (the runner hands every stage the
// same ones), and only the prepared image comes from the state, after the
// runtime has checked that its handle is one of its own.
//
// The container sees the job's builds, cache and scripts dirs at their host
// paths (the runner's scripts use absolute paths), the user's admitted
// volumes (job image only), and nothing else of the data dir: not the
// state dir, the image store, the probe cache or other jobs' dirs (see
// View).
func containerCommand(ctx context.Context, s containerSetup, st *State, stage, script string) (containerPlan, error) {
	p := s.Placement(st).Place(stage)
	plan := containerPlan{Placement: p}
	switch p {
	case policy.OnHost:
		return plan, nil
	case policy.InJobImage:
		plan.Image = st.Job
	case policy.InRunnerImage:
		plan.Image = st.Runner
	}
	if err := s.Runtime.CheckImage(*plan.Image, s.Layout.StateDir); err != nil {
		return plan, failure.Systemf("%s: the prepared image of this job is not one ci-exec made (%v); the job's state dir %s was changed", s.Runtime.Name(), err, s.Layout.StateDir)
	}
	info, err := s.Runtime.Probe(ctx)
	if err != nil {
		return plan, err
	}
	spec := mechanism.RunSpec{
		Info:    info,
		Image:   *plan.Image,
		Workdir: s.workdir(),
		Env:     s.containerEnv(),
		// The image's shell signals that it started before it runs the
		// script (see package outcome): a runtime failure is then never
		// taken for the script's exit code.
		Argv: outcome.StartCommand([]string{plan.Image.Shell, script}),
	}
	var vols []policy.Bind
	if p == policy.InJobImage {
		if s.siteErr != nil {
			return plan, s.siteErr
		}
		if vols, err = s.UserVolumes(info); err != nil {
			return plan, err
		}
		if err := s.applySite(&spec, info, false); err != nil {
			return plan, err
		}
		vols = append(vols, s.Site.Binds...)
		args, _, err := s.userArgsPolicy().UserArgs(s.Job.Vars)
		if err != nil {
			return plan, err
		}
		spec.AdminOptions = s.Cfg.CustomOptions
		spec.UserArgs = args
	} else {
		spec.AdminOptions = s.Cfg.RunnerOptions
	}
	if spec.Binds, err = s.View(info, vols); err != nil {
		return plan, failure.AsSystem(err)
	}
	if p == policy.InJobImage {
		// The services' names, on the loopback address (services.go).
		spec.Binds = append(spec.Binds, s.hostsBind(st, info)...)
	}
	argv, env, err := s.Runtime.Command(spec)
	if err != nil {
		return plan, failure.AsSystem(fmt.Errorf("build the %s command: %w", s.Runtime.Name(), err))
	}
	plan.Argv, plan.Env, plan.Dir = argv, env, s.Layout.ScriptsDir
	plan.UserArgs = len(spec.UserArgs) > 0
	return plan, nil
}

// UserVolumes are the user's volumes that pass the admin's policy, checked
// again in every stage (a source resolved at prepare could be swapped for
// a symlink before a later stage mounts it). A volume may not cover the
// job's own dirs or the data dir that holds them.
func (s containerSetup) UserVolumes(info mechanism.Info) ([]policy.Bind, error) {
	vols, err := s.volumePolicy().UserVolumes(s.Job.Vars)
	if err != nil {
		return nil, err
	}
	for _, v := range vols {
		if v.ReadOnly && !info.ReadOnlyBinds {
			return nil, failure.Userf("%s %s cannot mount volumes read-only (%s:%s:ro); drop \":ro\" from the %s_* variable",
				s.Runtime.Name(), info.Version, v.Src, v.Dst, s.Cfg.UserVolumeVariable)
		}
		if overlaps(v.Dst, s.Layout.DataDir) {
			return nil, failure.Userf("%s_*: the volume destination %s would cover the job's own builds, cache or scripts dirs under %s; mount it elsewhere, e.g. /data",
				s.Cfg.UserVolumeVariable, v.Dst, s.Layout.DataDir)
		}
	}
	return vols, nil
}

// overlaps reports whether a and b are the same path or one contains the
// other.
func overlaps(a, b string) bool {
	return policy.UnderAny(a, []string{b}) || policy.UnderAny(b, []string{a})
}

// View is the list of binds that shows a container the job's own dirs at
// their host paths and nothing else under the data dir: builds and cache
// read-write, the scripts dir read-only where the runtime can, then vols.
//
// A runtime that cannot create mount points (Info.FixedMountPoints:
// Charliecloud without a writable image) would need every job's dirs to
// exist in the image, which a SquashFS shared by the user's jobs cannot
// have. Instead, prepare makes the data dir itself a mount point in the
// image (the same for every job), and each stage binds an empty
// skeleton of the job's dirs there first, then the real dirs onto it: the
// rest of the data dir stays hidden underneath. The skeleton lives in the
// job's state dir, and is kept from stage to stage while its mount points
// are intact. When a bind lands under /tmp (a data dir under /tmp, a
// volume there), the skeleton covers /tmp too and is the job's private
// /tmp; otherwise the runtime gives the container a private /tmp itself.
func (s containerSetup) View(info mechanism.Info, vols []policy.Bind) ([]policy.Bind, error) {
	l := s.Layout
	own := []policy.Bind{policy.SamePath(l.BuildsDir), policy.SamePath(l.CacheDir), {Src: l.ScriptsDir, Dst: l.ScriptsDir, ReadOnly: info.ReadOnlyBinds}}
	if !info.FixedMountPoints {
		return append(own, vols...), nil
	}
	all := append(append([]policy.Bind(nil), own...), vols...)
	var anchors []string
	if policy.UnderAny(l.DataDir, []string{"/tmp"}) || anyUnder(all, "/tmp") {
		anchors = append(anchors, "/tmp")
	}
	if !policy.UnderAny(l.DataDir, []string{"/tmp"}) {
		anchors = append(anchors, l.DataDir)
	}
	root := filepath.Join(l.StateDir, "view")
	var out []policy.Bind
	type skeleton struct {
		dir  string
		rels []string
	}
	var skels []skeleton
	for i, anchor := range anchors {
		sk := skeleton{dir: filepath.Join(root, fmt.Sprint(i))}
		for _, b := range all {
			rel, err := filepath.Rel(anchor, b.Dst)
			if err != nil || rel == "." || strings.HasPrefix(rel, "..") {
				continue
			}
			sk.rels = append(sk.rels, rel)
		}
		skels = append(skels, sk)
		out = append(out, policy.Bind{Src: sk.dir, Dst: anchor})
	}
	// An earlier stage's view is kept when every mount point in it is
	// still a real directory (an Lstat per path component, far cheaper
	// than making it again): the container can write into its view, but
	// a symlink or file where a mount point belongs means it is rebuilt.
	intact := true
	for _, sk := range skels {
		intact = intact && realDirs(sk.dir, sk.rels)
	}
	if intact {
		return append(out, all...), nil
	}
	if err := os.RemoveAll(root); err != nil {
		return nil, fmt.Errorf("reset the container view %s: %w", root, err)
	}
	for _, sk := range skels {
		if err := os.MkdirAll(sk.dir, 0o700); err != nil {
			return nil, fmt.Errorf("create the container view: %w", err)
		}
		for _, rel := range sk.rels {
			if err := os.MkdirAll(filepath.Join(sk.dir, rel), 0o700); err != nil {
				return nil, fmt.Errorf("create the container view: %w", err)
			}
		}
	}
	return append(out, all...), nil
}

// realDirs reports whether dir and every component of each of rels under
// it are directories, none of them a symlink.
func realDirs(dir string, rels []string) bool {
	isDir := func(p string) bool {
		fi, err := os.Lstat(p)
		return err == nil && fi.IsDir()
	}
	if !isDir(dir) {
		return false
	}
	seen := map[string]bool{}
	for _, rel := range rels {
		p := dir
		for _, c := range strings.Split(rel, "/") {
			p = filepath.Join(p, c)
			if seen[p] {
				continue
			}
			if !isDir(p) {
				return false
			}
			seen[p] = true
		}
	}
	return true
}

// anyUnder reports whether a bind's destination lies under dir.
func anyUnder(binds []policy.Bind, dir string) bool {
	for _, b := range binds {
		if policy.UnderAny(b.Dst, []string{dir}) {
			return true
		}
	}
	return false
}

// workdir is the project dir when it lies in the builds dir and exists
// (CI_PROJECT_DIR comes from the user-controllable variables), else the
// builds dir itself: before get_sources the project dir may not exist yet,
// and the runtime refuses to start in a missing directory.
func (s containerSetup) workdir() string {
	dir := filepath.Clean(s.Job.Vars["CI_PROJECT_DIR"])
	if filepath.IsAbs(dir) && strings.HasPrefix(dir, s.Layout.BuildsDir+"/") {
		if fi, err := os.Stat(dir); err == nil && fi.IsDir() {
			return dir
		}
	}
	return s.Layout.BuildsDir
}

// containerEnv is the container's whole environment: the job user's
// identity, a container PATH, and the host variables the admin lists in the
// runtime's pass_env. The job's own variables are not here: the runner's
// script exports them itself, and the runner's own environment (with
// CUSTOM_ENV_ copies of every secret) must not leak in.
func (s containerSetup) containerEnv() []string {
	env := map[string]string{}
	for k, v := range s.HostEnv {
		if config.MatchAny(s.Cfg.PassEnv, k) {
			env[k] = v
		}
	}
	env["HOME"] = s.User.Home
	env["USER"] = s.User.Name
	env["LOGNAME"] = s.User.Name
	if _, ok := env["PATH"]; !ok {
		env["PATH"] = ContainerPath
	}
	out := make([]string, 0, len(env))
	for k, v := range env {
		out = append(out, k+"="+v)
	}
	sort.Strings(out)
	return out
}
