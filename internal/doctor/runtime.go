package doctor

import (
	"context"
	"crypto/tls"
	"debug/elf"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/mechanism/apptainer"
	"github.com/ci-exec/ci-exec/internal/mechanism/charliecloud"
	"github.com/ci-exec/ci-exec/internal/mechanism/kit"
	"github.com/ci-exec/ci-exec/internal/mechanism/template"
)

// checkRuntime probes the runtime with its own Probe (what every stage
// does) and then the system features that decide whether and how it runs.
func checkRuntime(ctx context.Context, r *Report, cfg *config.Config, m config.Mechanism, u config.UserInfo) {
	name := cfg.General.RunMechanism
	table := cfg.MechanismTable()
	if cfg.IsBatch() && m.ImageStorageDir == "" {
		m.ImageStorageDir = cfg.General.DataDir
	}
	var rt mechanism.Runtime
	switch name {
	case config.MechanismCharliecloud:
		rt = charliecloud.New(m, u, hostEnv(), cfg.General.KillTimeout.Duration)
	case config.MechanismApptainer:
		rt = apptainer.New(m, u, hostEnv(), cfg.General.KillTimeout.Duration)
	default:
		t := cfg.Template()
		if t == nil {
			return
		}
		// A template's programs and version action, as its stages see them.
		rt = template.New(cfg.General.TemplateName(), t, m, u, hostEnv(), cfg.General.KillTimeout.Duration, os.Getuid())
	}
	pctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	info, err := rt.Probe(pctx)
	if err != nil {
		fix := "install it"
		if m.ApplicationPath != "" {
			fix = fmt.Sprintf("install it in %s or correct %s.application_path", m.ApplicationPath, table)
		} else {
			fix += fmt.Sprintf(" on the system PATH (%s) or set %s.application_path", kit.SystemPath, table)
		}
		r.add(Check{Area: name, Status: Fail, Key: table + ".application_path", Message: oneLine(err.Error()), Fix: fix})
		return
	}
	r.ok(name, "%s", info.Describe(name))

	userns(r, name)
	switch name {
	case config.MechanismCharliecloud:
		if info.Features[charliecloud.FeatureWriteFake] {
			r.ok(name, "ch-run --write-fake: yes (bind targets need not exist in the image)")
		} else {
			r.ok(name, "ch-run --write-fake: no (ci-exec builds each container's mount points on a skeleton of the job's dirs)")
		}
		chRun := info.Program("ch-run")
		if libs, err := neededLibs(chRun); err == nil {
			if hasLib(libs, "libsquashfuse") {
				r.ok(name, "SquashFUSE: linked into ch-run (SquashFS images mount without root)")
				fuse(r, name, true)
			} else {
				r.add(Check{Area: name, Status: Warn, Message: "SquashFUSE: ch-run is built without it",
					Fix: "SquashFS images (batch jobs, convert = true) cannot be mounted; use a ch-run built with libsquashfuse or disable_convert"})
			}
		}
		if cfg.IsBatch() && !m.DisableConvert || m.Convert {
			if info.Programs["ch-convert"] == "" {
				r.add(Check{Area: name, Status: Fail, Message: "ch-convert is missing but images are converted (executor slurm or convert = true)",
					Fix: "install Charliecloud's ch-convert, or set " + table + ".disable_convert = true"})
			}
			if _, err := exec.LookPath("mksquashfs"); err != nil && !inDir(m.ApplicationPath, "mksquashfs") {
				r.add(Check{Area: name, Status: Fail, Message: "mksquashfs is missing: ch-convert cannot make SquashFS images",
					Fix: "install squashfs-tools, or set " + table + ".disable_convert = true"})
			}
		}
		if p, err := exec.LookPath("ch-checkns"); err == nil {
			cctx, ccancel := context.WithTimeout(ctx, 30*time.Second)
			out, err := exec.CommandContext(cctx, p).CombinedOutput()
			ccancel()
			if err != nil {
				r.add(Check{Area: name, Status: Fail, Message: "ch-checkns failed: " + oneLine(string(out)),
					Fix: "unprivileged user namespaces must work for Charliecloud (sysctl user.max_user_namespaces, kernel.unprivileged_userns_clone, AppArmor restrict_unprivileged_userns)"})
			} else {
				r.ok(name, "ch-checkns: user namespaces work")
			}
		}
	case config.MechanismApptainer:
		bin := info.Program("apptainer")
		libexec := filepath.Join(filepath.Dir(filepath.Dir(bin)), "libexec", "apptainer", "bin")
		var missing []string
		for _, tool := range []string{"squashfuse_ll", "fuse2fs"} {
			if !inDir(libexec, tool) {
				if _, err := exec.LookPath(tool); err != nil {
					missing = append(missing, tool)
				}
			}
		}
		if len(missing) > 0 {
			r.add(Check{Area: name, Status: Warn, Message: "internal SquashFS: " + strings.Join(missing, ", ") + " not found",
				Fix: "without them an unprivileged Apptainer extracts every SIF to a temporary sandbox (slow, disk-hungry); install Apptainer's bundled FUSE tools"})
		} else {
			r.ok(name, "internal SquashFS: squashfuse_ll and fuse2fs found (SIF images mount without extraction)")
		}
		fuse(r, name, len(missing) == 0)
	}
	cgroups(r, name)
	siteChecks(r, cfg, name, info)
}

// siteChecks says whether the host has what [gpu] and [limits] need with
// this runtime (issue 15).
func siteChecks(r *Report, cfg *config.Config, name string, info mechanism.Info) {
	if cfg.GPU.Enabled {
		var missing []string
		if !info.Features[mechanism.FeatureGPU] {
			missing = append(missing, name+"'s GPU support (Charliecloud: ch-fromhost and nvidia-container-cli; Apptainer: --nv)")
		}
		if _, err := os.Stat("/dev/nvidia0"); err != nil {
			missing = append(missing, "an NVIDIA device (/dev/nvidia0)")
		}
		if _, err := exec.LookPath("nvidia-container-cli"); err != nil && name == config.MechanismApptainer {
			missing = append(missing, "nvidia-container-cli (apptainer --nv then binds the libraries listed in nvliblist.conf)")
		}
		if len(missing) == 0 {
			r.ok(name, "GPUs: the NVIDIA device and %s's GPU support are there", name)
		} else {
			r.add(Check{Area: name, Status: Warn, Key: "gpu.enabled", Message: "GPUs: this host lacks " + strings.Join(missing, ", "),
				Fix: "install NVIDIA's driver and libnvidia-container tools on GPU nodes, or enable [gpu] only on runners that have them; GPU jobs fail here"})
		}
	}
	if cfg.Limits.Set() && !cfg.IsBatch() {
		if info.Features[mechanism.FeatureLimits] {
			r.ok(name, "limits: CPU and memory limits are enforced by %s", name)
		} else {
			r.add(Check{Area: name, Status: Warn, Key: "limits", Message: "limits: " + name + " cannot enforce CPU and memory limits on this host for this user",
				Fix: "jobs run without them and say so in their log; use cgroup v2 with the cpu and memory controllers delegated to the job users (Apptainer), or the Slurm executor"})
		}
	}
}

// probeOther reports the version of a runtime that has a table but is not
// the run_mechanism; it failing is only a warning, no job uses it.
func probeOther(ctx context.Context, r *Report, cfg *config.Config, name string, u config.UserInfo) {
	m := cfg.General.Charliecloud
	var rt mechanism.Runtime = charliecloud.New(m, u, hostEnv(), cfg.General.KillTimeout.Duration)
	if name == config.MechanismApptainer {
		m = cfg.General.Apptainer
		rt = apptainer.New(m, u, hostEnv(), cfg.General.KillTimeout.Duration)
	}
	pctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	info, err := rt.Probe(pctx)
	if err != nil {
		r.add(Check{Area: name, Status: Warn, Key: "general." + name, Message: oneLine(err.Error()) + " (configured, not the run_mechanism)",
			Fix: "install it before switching general.run_mechanism to " + name})
		return
	}
	r.ok(name, "%s (configured, not the run_mechanism)", info.Describe(name))
}

// userns checks the kernel's unprivileged user namespaces.
func userns(r *Report, name string) {
	b, err := os.ReadFile("/proc/sys/user/max_user_namespaces")
	if err == nil && strings.TrimSpace(string(b)) == "0" {
		r.add(Check{Area: name, Status: Fail, Message: "user namespaces: off (user.max_user_namespaces = 0)",
			Fix: "sysctl -w user.max_user_namespaces=15000 (and in /etc/sysctl.d)"})
		return
	}
	if b, err := os.ReadFile("/proc/sys/kernel/unprivileged_userns_clone"); err == nil && strings.TrimSpace(string(b)) == "0" {
		r.add(Check{Area: name, Status: Fail, Message: "user namespaces: unprivileged ones are off (kernel.unprivileged_userns_clone = 0)",
			Fix: "sysctl -w kernel.unprivileged_userns_clone=1 (and in /etc/sysctl.d)"})
		return
	}
	if b, err := os.ReadFile("/proc/sys/kernel/apparmor_restrict_unprivileged_userns"); err == nil && strings.TrimSpace(string(b)) == "1" {
		r.add(Check{Area: name, Status: Warn, Message: "user namespaces: AppArmor restricts unprivileged ones",
			Fix: "give the runtime an AppArmor profile that allows userns, or sysctl kernel.apparmor_restrict_unprivileged_userns=0"})
		return
	}
	r.ok(name, "user namespaces: available to unprivileged users")
}

// fuse checks /dev/fuse, which SquashFUSE and fuse2fs need.
func fuse(r *Report, name string, needed bool) {
	f, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0)
	if err == nil {
		f.Close()
		r.ok(name, "FUSE: /dev/fuse usable")
		return
	}
	st := Warn
	if needed {
		st = Fail
	}
	r.add(Check{Area: name, Status: st, Message: fmt.Sprintf("FUSE: /dev/fuse not usable (%v)", errors.Unwrap(err)),
		Fix: "load the fuse module and make /dev/fuse mode 0666 (Debian's fuse3 package does)"})
}

// cgroups reports whether resource limits could be applied to the user's
// containers (cgroup v2 with the controllers delegated to the user).
func cgroups(r *Report, name string) {
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err != nil {
		r.add(Check{Area: name, Status: Warn, Message: "cgroups: not cgroup v2",
			Fix: "resource limits in containers (e.g. apptainer --apply-cgroups) need a unified cgroup v2 hierarchy; jobs run without them"})
		return
	}
	b, _ := os.ReadFile("/proc/self/cgroup")
	rel := ""
	for _, l := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(l, "0::"); ok {
			rel = p
		}
	}
	dir := filepath.Join("/sys/fs/cgroup", rel)
	ctl, _ := os.ReadFile(filepath.Join(dir, "cgroup.controllers"))
	fi, err := os.Stat(dir)
	if err == nil {
		if o, ok := owner(fi); ok && o == uint32(os.Getuid()) {
			r.ok(name, "cgroups: v2, delegated to the user (%s)", strings.TrimSpace(string(ctl)))
			return
		}
	}
	r.add(Check{Area: name, Status: Warn, Message: "cgroups: v2, but " + dir + " is not delegated to the user",
		Fix: "resource limits need systemd delegation (Delegate=yes, e.g. a user session or a runner unit with it); jobs run without them"})
}

func inDir(dir, name string) bool {
	if dir == "" {
		return false
	}
	fi, err := os.Stat(filepath.Join(dir, name))
	return err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0
}

func neededLibs(path string) ([]string, error) {
	f, err := elf.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return f.ImportedLibraries()
}

func hasLib(libs []string, prefix string) bool {
	for _, l := range libs {
		if strings.HasPrefix(l, prefix) {
			return true
		}
	}
	return false
}

func oneLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	return s
}

// allowlistRegistries are the registries the allowlist entries (and the
// default and runner images) name literally: the host[:port] before the
// first / when it has no pattern characters but escaped dots.
func allowlistRegistries(m config.Mechanism) []string {
	set := map[string]bool{}
	hostRE := regexp.MustCompile(`^\^?((?:[A-Za-z0-9-]|\\\.)+(?::[0-9]+)?)/`)
	for _, e := range m.ImageAllowlist {
		if mm := hostRE.FindStringSubmatch(e); mm != nil {
			h := strings.ReplaceAll(mm[1], `\.`, ".")
			if strings.Contains(h, ".") || strings.Contains(h, ":") || h == "localhost" {
				set[h] = true
			}
		}
	}
	for _, img := range []string{m.DefaultImage, m.RunnerImage} {
		if h, _, ok := strings.Cut(img, "/"); ok && (strings.Contains(h, ".") || strings.Contains(h, ":")) {
			set[h] = true
		}
	}
	var out []string
	for h := range set {
		out = append(out, h)
	}
	sort.Strings(out)
	return out
}

// checkRegistries asks each registry the allowlist implies for /v2/: any
// HTTP answer (200, 401) means a pull can reach it.
func checkRegistries(ctx context.Context, r *Report, cfg *config.Config, m config.Mechanism) {
	table := cfg.MechanismTable()
	regs := allowlistRegistries(m)
	if len(m.ImageAllowlist) > 0 && len(regs) == 0 {
		r.add(Check{Area: "registry", Status: Warn, Key: table + ".image_allowlist",
			Message: "the image allowlist names no registry literally; no registry was tried"})
	}
	insecure := map[string]bool{}
	for _, h := range m.InsecureRegistries {
		insecure[h] = true
	}
	for _, h := range regs {
		if h == "docker.io" || h == "index.docker.io" {
			h = "registry-1.docker.io"
		}
		tr := &http.Transport{Proxy: http.ProxyFromEnvironment, TLSHandshakeTimeout: 10 * time.Second}
		if insecure[h] {
			tr.TLSClientConfig = &tls.Config{InsecureSkipVerify: true} //nolint:gosec // the admin listed it in insecure_registries
		}
		client := &http.Client{Transport: tr, Timeout: 15 * time.Second}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+h+"/v2/", nil)
		resp, err := client.Do(req)
		if err != nil && insecure[h] && cfg.General.RunMechanism == config.MechanismApptainer {
			// Apptainer pulls from an insecure registry over plain HTTP.
			req, _ = http.NewRequestWithContext(ctx, http.MethodGet, "http://"+h+"/v2/", nil)
			resp, err = client.Do(req)
		}
		if err != nil {
			fix := "check the host name, the firewall and the proxy settings (HTTPS_PROXY) of the runner"
			var cerr *tls.CertificateVerificationError
			var uerr interface{ Timeout() bool }
			switch {
			case errors.As(err, &cerr):
				fix = "add the registry's CA to the system's trust store, or list it in " + table + ".insecure_registries"
			case errors.As(err, &uerr) && uerr.Timeout():
				fix = "the registry did not answer in time; check the firewall and proxy settings"
			}
			var operr *net.OpError
			if errors.As(err, &operr) && operr.Op == "dial" {
				fix = "nothing answers at " + h + "; check the host name and port"
			}
			r.add(Check{Area: "registry", Status: Fail, Key: table + ".image_allowlist", Message: fmt.Sprintf("%s: %v", h, oneLine(err.Error())), Fix: fix})
			continue
		}
		resp.Body.Close()
		r.ok("registry", "%s answers (HTTP %d on /v2/)", h, resp.StatusCode)
	}
}
