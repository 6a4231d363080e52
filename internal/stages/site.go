package stages

// What a job gets from the site tables (issue 15): the profile it picked
// with CI_EXEC_PROFILE, its resource limits and whether it has a GPU.
// Everything is recomputed from the config and the job's variables in
// every stage, as the rest of the policy is.

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/ci-exec/ci-exec/internal/batch"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/policy"
)

// Job variables of the site tables.
const (
	varProfile = "CI_EXEC_PROFILE"
	varCPUs    = "CI_EXEC_CPUS"
	varMemory  = "CI_EXEC_MEMORY"
	varTmp     = "CI_EXEC_TMP"
	varGPU     = "CI_EXEC_GPU"
)

// jobSite is the job's profile, limits and GPU.
type jobSite struct {
	// Name is the profile's name ("" for none).
	Name    string
	Profile config.Profile
	Binds   []policy.Bind
	Limits  mechanism.Limits
	GPU     bool
}

// siteFor reads the job's choices and checks them against the config: an
// unknown profile or a request above a cap is the user's to fix.
func siteFor(cfg *config.Config, vars map[string]string) (jobSite, error) {
	var js jobSite
	if name := strings.TrimSpace(vars[varProfile]); name != "" {
		p, ok := cfg.Profiles[name]
		if !ok {
			have := "this runner has none"
			if names := cfg.ProfileNames(); len(names) > 0 {
				have = "this runner has " + strings.Join(names, ", ")
			}
			return js, failure.Userf("%s=%q names no profile: %s; set %s to one of them or remove it", varProfile, name, have, varProfile)
		}
		js.Name, js.Profile, js.GPU = name, p, p.GPU
		for _, b := range p.Binds {
			pb, err := config.ParseProfileBind(b)
			if err != nil { // Validate checked it already
				return js, failure.Systemf("profiles.%s.binds: %v", name, err)
			}
			js.Binds = append(js.Binds, policy.Bind{Src: pb.Src, Dst: pb.Dst, ReadOnly: pb.ReadOnly})
		}
	}
	var err error
	if js.Limits, err = limitsFor(cfg.Limits, vars); err != nil {
		return js, err
	}
	if v := strings.TrimSpace(vars[varGPU]); v != "" {
		want, perr := strconv.ParseBool(v)
		switch {
		case perr != nil:
			return js, failure.Userf("%s=%q is not true or false", varGPU, v)
		case want && !(cfg.GPU.Enabled && cfg.GPU.PerJob):
			return js, failure.Userf("%s: this runner does not let jobs ask for a GPU themselves; use a profile with a GPU (%s) or ask the admin", varGPU, varProfile)
		}
		js.GPU = js.GPU || want
	}
	return js, nil
}

// limitsFor applies the job's requests (or the defaults) under the caps.
func limitsFor(l config.Limits, vars map[string]string) (mechanism.Limits, error) {
	out := mechanism.Limits{CPUs: l.DefaultCPUs, MemoryBytes: l.DefaultMemory.Bytes, TmpBytes: l.DefaultTmp.Bytes}
	if v := strings.TrimSpace(vars[varCPUs]); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			return out, failure.Userf("%s=%q is not a whole number of CPUs (e.g. 4)", varCPUs, v)
		}
		if l.MaxCPUs > 0 && n > l.MaxCPUs {
			return out, failure.Userf("%s=%d is above this runner's limit of %d CPUs (limits.max_cpus); ask for at most %d", varCPUs, n, l.MaxCPUs, l.MaxCPUs)
		}
		out.CPUs = n
	}
	size := func(name string, max int64, capKey string, dst *int64) error {
		v := strings.TrimSpace(vars[name])
		if v == "" {
			return nil
		}
		var b config.ByteSize
		if err := b.UnmarshalText([]byte(v)); err != nil || b.Bytes == 0 {
			return failure.Userf("%s=%q is not a size (e.g. 512M or 4G)", name, v)
		}
		if max > 0 && b.Bytes > max {
			return failure.Userf("%s=%s is above this runner's limit of %s (%s); ask for at most that", name, v, humanBytes(max), capKey)
		}
		*dst = b.Bytes
		return nil
	}
	if err := size(varMemory, l.MaxMemory.Bytes, "limits.max_memory", &out.MemoryBytes); err != nil {
		return out, err
	}
	if err := size(varTmp, l.MaxTmp.Bytes, "limits.max_tmp", &out.TmpBytes); err != nil {
		return out, err
	}
	return out, nil
}

// humanBytes writes a size the way the config and the variables do.
func humanBytes(b int64) string {
	for _, u := range []struct {
		s string
		n int64
	}{{"T", 1 << 40}, {"G", 1 << 30}, {"M", 1 << 20}, {"K", 1 << 10}} {
		if b >= u.n && b%u.n == 0 {
			return fmt.Sprintf("%d%s", b/u.n, u.s)
		}
	}
	return fmt.Sprint(b)
}

// Describe is the job-log line of what applied.
func (js jobSite) Describe() []string {
	var out []string
	if js.Name != "" {
		line := "Using the site profile " + js.Name
		if d := js.Profile.Description; d != "" {
			line += ": " + d
		}
		out = append(out, line)
	}
	var lim []string
	if js.Limits.CPUs > 0 {
		lim = append(lim, fmt.Sprintf("%d CPUs", js.Limits.CPUs))
	}
	if js.Limits.MemoryBytes > 0 {
		lim = append(lim, humanBytes(js.Limits.MemoryBytes)+" memory")
	}
	if js.Limits.TmpBytes > 0 {
		lim = append(lim, humanBytes(js.Limits.TmpBytes)+" /tmp")
	}
	if len(lim) > 0 {
		out = append(out, "Resource limits: "+strings.Join(lim, ", "))
	}
	if js.GPU {
		out = append(out, "GPU support is on for this job.")
	}
	return out
}

// schedulerOptions are the sbatch options the site adds after the admin's
// batch.options: the profile's scheduler_parameters, then the limits and
// the GPU, which the user's own parameters cannot undo (sbatch keeps the
// last of a repeated option, and these come after the user's).
func (js jobSite) schedulerOptions(cfg *config.Config) (profile, enforced []string) {
	profile = js.Profile.SchedulerParameters
	if js.Limits.CPUs > 0 {
		enforced = append(enforced, fmt.Sprintf("--cpus-per-task=%d", js.Limits.CPUs))
	}
	if js.Limits.MemoryBytes > 0 {
		enforced = append(enforced, fmt.Sprintf("--mem=%dM", (js.Limits.MemoryBytes+(1<<20)-1)>>20))
	}
	if js.Limits.TmpBytes > 0 {
		enforced = append(enforced, fmt.Sprintf("--tmp=%dM", (js.Limits.TmpBytes+(1<<20)-1)>>20))
	}
	if js.GPU {
		enforced = append(enforced, "--gres="+cfg.GPU.Gres)
	}
	return profile, enforced
}

// profileEnv adds the profile's env to a KEY=VALUE list (later wins).
func (js jobSite) profileEnv(env []string) []string {
	if len(js.Profile.Env) == 0 {
		return env
	}
	m := map[string]string{}
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		m[k] = v
	}
	for _, kv := range js.Profile.Env {
		k, v, _ := strings.Cut(kv, "=")
		m[k] = v
	}
	return envList(m)
}

// siteSchedulerArgs puts the site's sbatch options around the user's
// checked ones: the profile's scheduler_parameters first (admin options,
// checked as batch.options are; the user may override them as they may
// batch.options), the enforced limits and GPU last.
func siteSchedulerArgs(st *Stage, user []string) ([]string, error) {
	js, err := siteFor(st.Cfg, st.Job.Vars)
	if err != nil {
		return nil, err
	}
	profile, enforced := js.schedulerOptions(st.Cfg)
	if err := batch.CheckAdminOptions(profile); err != nil {
		return nil, failure.Systemf("profiles.%s.scheduler_parameters: %s", js.Name, strings.TrimPrefix(err.Error(), "batch.options: "))
	}
	out := append(append([]string(nil), profile...), user...)
	return append(out, enforced...), nil
}

// profileOptions appends the job's profile's run options for the
// configured runtime to opts. An unknown profile adds nothing here:
// siteFor reports it.
func profileOptions(st *Stage, opts []string) []string {
	p, ok := st.Cfg.Profiles[strings.TrimSpace(st.Job.Vars[varProfile])]
	if !ok || len(p.Options[st.Cfg.General.RunMechanism]) == 0 {
		return opts
	}
	return append(append([]string(nil), opts...), p.Options[st.Cfg.General.RunMechanism]...)
}

// applySite puts the profile's env, the limits and the GPU into a job
// image's run spec and checks the profile's binds against what the runtime
// can do; at prepare it also says, once, what cannot be enforced.
func (s containerSetup) applySite(spec *mechanism.RunSpec, info mechanism.Info, atPrepare bool) error {
	js := s.Site
	for _, b := range js.Binds {
		if b.ReadOnly && !info.ReadOnlyBinds {
			return failure.Systemf("profiles.%s.binds: %s %s cannot mount %s read-only; the admin must drop \":ro\" from the profile for this runtime",
				js.Name, s.Runtime.Name(), info.Version, b.Src)
		}
		if overlaps(b.Dst, s.Layout.DataDir) {
			return failure.Systemf("profiles.%s.binds: %s would cover the job's own dirs under %s; the admin must mount it elsewhere", js.Name, b.Dst, s.Layout.DataDir)
		}
	}
	spec.Env = js.profileEnv(spec.Env)
	if js.GPU {
		if !info.Features[mechanism.FeatureGPU] {
			return failure.Systemf("the job asks for a GPU but this host lacks what %s needs for GPUs (see ci-exec check and docs/admin-guide.md, GPUs)", s.Runtime.Name())
		}
		spec.GPU = true
	}
	lim := js.Limits
	if s.Batch {
		// Slurm enforces them (sbatch options); the container adds none.
		return nil
	}
	if lim.CPUs > 0 || lim.MemoryBytes > 0 {
		if info.Features[mechanism.FeatureLimits] {
			spec.Limits.CPUs, spec.Limits.MemoryBytes = lim.CPUs, lim.MemoryBytes
		} else if atPrepare {
			s.Log.Warnf("the CPU and memory limits cannot be enforced on this host (%s needs cgroup v2 with the cpu and memory controllers delegated to the job's user); the job runs without them", s.Runtime.Name())
		}
	}
	if lim.TmpBytes > 0 {
		if info.Features[mechanism.FeatureTmpSize] {
			spec.Limits.TmpBytes = lim.TmpBytes
		} else if atPrepare {
			s.Log.Warnf("a /tmp of %s cannot be given by %s; the job's /tmp has the runtime's default size", humanBytes(lim.TmpBytes), s.Runtime.Name())
		}
	}
	return nil
}

// warnHostLimits says that a job whose scripts run on the host of the
// runner (no container, no scheduler) runs without its limits: ci-exec has
// nothing to enforce them with there.
func (js jobSite) warnHostLimits(st *Stage) {
	l := js.Limits
	if st.Cfg.IsBatch() || l.CPUs == 0 && l.MemoryBytes == 0 && l.TmpBytes == 0 {
		return
	}
	onHost := st.Cfg.Mechanism() == nil || st.Job.Image() == "" && !st.Cfg.General.ForceMechanism
	if onHost {
		st.Log.Warnf("the job's resource limits cannot be enforced for a job that runs on the host without a container; it runs without them")
	}
}
