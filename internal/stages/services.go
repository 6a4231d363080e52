package stages

// The job's services (issue 15): checked with the job's image, started
// in prepare with the job's runtime after the job's image is ready,
// reachable from the job's container at their host names through a
// hosts file bound at /etc/hosts, and stopped in cleanup.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/policy"
	"github.com/ci-exec/ci-exec/internal/services"
)

// ServiceState is one started service in the job's state.
type ServiceState struct {
	Run   services.Running `json:"run"`
	Image mechanism.Image  `json:"image"`
}

// servicesDir holds the services' logs and the hosts file, in the job's
// state dir (no container sees it; the hosts file is bound on its own).
func (s containerSetup) servicesDir() string { return filepath.Join(s.Layout.StateDir, "services") }

func (s containerSetup) hostsFile() string { return filepath.Join(s.servicesDir(), "hosts") }

// jobServices reads and checks the job's services before anything is
// pulled: the same allowlist as the job's image, a runtime that can run
// them, the admin's limits. ref is the job's own image (nil: the job
// runs on the host).
func (s containerSetup) jobServices(ref *policy.Ref) ([]services.Spec, []policy.Ref, error) {
	specs, err := services.Parse(s.Job.Vars[services.Variable], s.Job.ServicePorts())
	if err != nil {
		return nil, nil, failure.Userf("services: %v", err)
	}
	if len(specs) == 0 {
		return nil, nil, nil
	}
	switch {
	case s.Services.Disabled:
		return nil, nil, failure.Userf("this runner runs no services (services.disabled); remove services: from the job")
	case ref == nil:
		return nil, nil, failure.Userf("services: need the job to run in a container: add an image: to the job")
	case s.Batch:
		return nil, nil, failure.Userf("services: this runner runs the job's scripts on Slurm compute nodes, where services started on the login node are out of reach; remove services: from the job")
	case len(specs) > s.Services.Max:
		return nil, nil, failure.Userf("services: the job has %d services, this runner allows %d (services.max)", len(specs), s.Services.Max)
	}
	allow, err := policy.NewAllowlist(s.Cfg.ImageAllowlist)
	if err != nil {
		return nil, nil, failure.AsSystem(err)
	}
	allow.Key = s.key("image_allowlist")
	refs := make([]policy.Ref, len(specs))
	ports := map[int]string{}
	for i, sp := range specs {
		r, err := policy.ParseImage(sp.Image)
		if err != nil {
			return nil, nil, failure.Userf("service %s: %v", sp.Name(), err)
		}
		if err := allow.Check(r); err != nil {
			return nil, nil, failure.Userf("service %s: %v", sp.Name(), err)
		}
		if len(sp.Argv()) == 0 && s.Runtime.Name() == config.MechanismCharliecloud {
			return nil, nil, failure.Userf("service %s: ch-run cannot run an image's own entrypoint; give the service an entrypoint: or command:", sp.Name())
		}
		for _, p := range sp.Ports {
			if other, dup := ports[p]; dup {
				return nil, nil, failure.Userf("services %s and %s both wait on port %d; services share the host's network, so each needs its own port", other, sp.Name(), p)
			}
			ports[p] = sp.Name()
		}
		refs[i] = r
	}
	return specs, refs, nil
}

// startServices pulls and starts each service and waits until it
// listens. Every started service is in st (and saved) at once, so the
// cleanup stage stops it whatever happens next; on an error prepare stops
// them itself.
func (s containerSetup) startServices(ctx context.Context, st *State, info mechanism.Info, specs []services.Spec, refs []policy.Ref) error {
	if len(specs) == 0 {
		return nil
	}
	s.stopEarlierAttempt(ctx)
	if !info.Features[mechanism.FeatureServices] {
		return failure.Userf("services: %s cannot run services in ci-exec yet; remove services: from the job", s.Runtime.Name())
	}
	if err := os.MkdirAll(s.servicesDir(), 0o700); err != nil {
		return failure.AsSystem(err)
	}
	debug := truthy(s.Job.Vars[services.DebugVariable])
	for i, sp := range specs {
		cred, err := auth.Choose(s.Job, refs[i].Registry, s.Runtime.CredentialVariables())
		if err != nil {
			return err
		}
		s.Log.AddSecrets(cred.Password())
		img, err := s.pull(ctx, refs[i], cred, s.Cfg.PullPolicy, "-svc"+strconv.Itoa(i), s.mountPoints(nil))
		if err != nil {
			return err
		}
		if err := services.CheckFree(sp.Ports); err != nil {
			// Released here: the service never ran, st does not list it.
			_ = s.Runtime.Release(ctx, *img, s.Layout.StateDir)
			return failure.Userf("service %s: %v; use another port, or run the jobs one after the other", sp.Name(), err)
		}
		argv, env, err := s.Runtime.Command(mechanism.RunSpec{
			Info: info, Image: *img, Workdir: "/", Env: s.serviceEnv(sp), Service: true, Argv: sp.Argv(),
			ImageEntrypoint: len(sp.Entrypoint) == 0,
		})
		if err != nil {
			_ = s.Runtime.Release(ctx, *img, s.Layout.StateDir)
			return failure.AsSystem(fmt.Errorf("build the %s command of service %s: %w", s.Runtime.Name(), sp.Name(), err))
		}
		LogCommand(s.Log, "service_"+strconv.Itoa(i), fmt.Sprintf("Starting service %s (%s) with %s", sp.Name(), refs[i].Full, s.Runtime.Name()), argv, env)
		logPath := filepath.Join(s.servicesDir(), strconv.Itoa(i)+"-"+sp.Name()+".log")
		run, err := services.Start(argv, env, s.Layout.StateDir, logPath)
		if err != nil {
			_ = s.Runtime.Release(ctx, *img, s.Layout.StateDir)
			return failure.Systemf("start service %s: %v", sp.Name(), err)
		}
		run.Name, run.Hosts, run.Image, run.Ports = sp.Name(), sp.Hosts, refs[i].Full, sp.Ports
		st.Services = append(st.Services, ServiceState{Run: run, Image: *img})
		if s.keep != nil {
			s.keep(run.PID)
		}
		if err := s.saveState(st); err != nil {
			return failure.AsSystem(err)
		}
		if err := s.waitService(ctx, run); err != nil {
			return err
		}
		if debug {
			s.showServiceOutput(run)
		}
	}
	host, _ := os.ReadFile("/etc/hosts")
	if err := os.WriteFile(s.hostsFile(), services.HostsFile(host, specs), 0o644); err != nil {
		return failure.AsSystem(fmt.Errorf("write the services' hosts file: %w", err))
	}
	return nil
}

// stopEarlierAttempt stops the services an earlier attempt of this
// prepare left in the job's state (it was killed before it could stop
// them itself; the runner retries prepare): they would hold the ports.
func (s containerSetup) stopEarlierAttempt(ctx context.Context) {
	if s.loadState == nil {
		return
	}
	prev, err := s.loadState()
	if err != nil || len(prev.Services) == 0 {
		return
	}
	s.Log.Printf("Stopping the services of an earlier attempt of this prepare.")
	s.stopServices(ctx, prev)
}

// waitService waits until run listens on its ports, within
// services.wait_timeout.
func (s containerSetup) waitService(ctx context.Context, run services.Running) error {
	names := strings.Join(run.Hosts, ", ")
	if len(run.Ports) == 0 {
		if !run.Alive() {
			return failure.Userf("service %s exited at once%s", run.Name, s.lastLines(run))
		}
		s.Log.Printf("Service %s (%s) started; reach it as %s. It names no port to wait for (set %s in its variables to wait until it listens).",
			run.Name, run.Image, names, services.PortVariable)
		return nil
	}
	limit := s.Services.WaitTimeout.Duration
	wctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	err := run.Wait(wctx)
	var taken *services.PortTakenError
	switch {
	case err == nil:
		s.Log.Printf("Service %s (%s) is listening on port %s; reach it as %s.", run.Name, run.Image, joinInts(run.Ports), names)
		return nil
	case errors.Is(err, services.ErrExited):
		return failure.Userf("service %s exited before it listened on port %s%s", run.Name, joinInts(run.Ports), s.lastLines(run))
	case errors.As(err, &taken):
		return failure.Userf("service %s: %v; use another port, or run the jobs one after the other", run.Name, err)
	case ctx.Err() != nil:
		return failure.Systemf("prepare was stopped while waiting for service %s", run.Name)
	default:
		return failure.Userf("service %s did not listen on port %s within %s (services.wait_timeout)%s", run.Name, joinInts(run.Ports), limit, s.lastLines(run))
	}
}

func (s containerSetup) lastLines(run services.Running) string {
	lines := run.LastLines(5)
	if len(lines) == 0 {
		return " (it printed nothing)"
	}
	return "; its last output: " + strings.Join(lines, " | ")
}

// serviceEnv is a service container's environment: the job user's
// identity, a container PATH and the service's own variables. Nothing of
// the job's variables or the host's reaches it.
func (s containerSetup) serviceEnv(sp services.Spec) []string {
	env := map[string]string{"HOME": s.User.Home, "USER": s.User.Name, "LOGNAME": s.User.Name, "PATH": ContainerPath}
	for k, v := range sp.Variables {
		if k != "HOME" && k != "USER" {
			env[k] = v
		}
	}
	return envList(env)
}

// showServiceOutput puts what the service printed since last shown into
// the job log (CI_DEBUG_SERVICES), each line marked with the service.
func (s containerSetup) showServiceOutput(run services.Running) {
	mark := run.Log + ".shown"
	b, err := os.ReadFile(run.Log)
	if err != nil {
		return
	}
	from := 0
	if m, err := os.ReadFile(mark); err == nil {
		from, _ = strconv.Atoi(strings.TrimSpace(string(m)))
	}
	if from > len(b) {
		from = 0
	}
	for _, l := range strings.Split(strings.TrimRight(string(b[from:]), "\n"), "\n") {
		if l != "" {
			s.Log.Printf("[service:%s] %s", run.Name, l)
		}
	}
	_ = os.WriteFile(mark, []byte(strconv.Itoa(len(b))), 0o600)
}

// showServicesOutput is showServiceOutput for every service of the job,
// at the end of each stage when CI_DEBUG_SERVICES is set.
func showServicesOutput(st *Stage) {
	if !truthy(st.Job.Vars[services.DebugVariable]) {
		return
	}
	s, err := setup(st)
	if err != nil || s == nil {
		return
	}
	state, err := st.loadState()
	if err != nil {
		return
	}
	for _, sv := range state.Services {
		s.showServiceOutput(sv.Run)
	}
}

// stopServices stops the job's services (cleanup, and prepare when it
// fails after starting some) and releases their images.
func (s containerSetup) stopServices(ctx context.Context, st *State) {
	for _, sv := range st.Services {
		left := sv.Run.Stop(s.Grace)
		if len(left) > 0 {
			s.Log.Warnf("service %s: could not stop %s", sv.Run.Name, strings.Join(left, ", "))
		} else {
			s.Log.Printf("Stopped service %s.", sv.Run.Name)
		}
		if err := s.Runtime.CheckImage(sv.Image, s.Layout.StateDir); err != nil {
			s.Log.Warnf("service %s: not releasing its image: %v", sv.Run.Name, err)
			continue
		}
		if err := s.Runtime.Release(ctx, sv.Image, s.Layout.StateDir); err != nil {
			s.Log.Warnf("service %s: release image %s: %v", sv.Run.Name, sv.Image.Ref, err)
		}
	}
}

// hostsBind is the bind of the services' hosts file over the job
// container's /etc/hosts.
func (s containerSetup) hostsBind(st *State, info mechanism.Info) []policy.Bind {
	if len(st.Services) == 0 {
		return nil
	}
	return []policy.Bind{{Src: s.hostsFile(), Dst: "/etc/hosts", ReadOnly: info.ReadOnlyBinds}}
}

func truthy(v string) bool {
	b, err := strconv.ParseBool(strings.TrimSpace(v))
	return err == nil && b
}

func joinInts(ns []int) string {
	out := make([]string, len(ns))
	for i, n := range ns {
		out[i] = strconv.Itoa(n)
	}
	return strings.Join(out, ", ")
}
