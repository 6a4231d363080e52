package doctor

import (
	"bytes"
	"cmp"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"syscall"

	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/downscope"
	"github.com/ci-exec/ci-exec/internal/job"
)

// Run checks the configuration at path for the calling user.
func Run(ctx context.Context, path string) *Report {
	name, home, err := job.CurrentUser()
	r := &Report{ConfigPath: path, User: name}
	if err != nil {
		r.add(Check{Area: "user", Status: Fail, Message: err.Error(), Fix: "run ci-exec as a user in the password database"})
		return r
	}
	u := config.UserInfo{Name: name, Home: home}
	cfg, doc := checkConfig(r, path, u)
	if cfg == nil {
		return r
	}
	checkDataDir(r, cfg)
	if m := cfg.Mechanism(); m != nil {
		checkStorage(r, cfg, *m, u)
		checkRuntime(ctx, r, cfg, *m, u)
		checkRegistries(ctx, r, cfg, *m)
	} else {
		r.ok("runtime", "jobs run on the host (no general.run_mechanism)")
	}
	// A runtime with a table of its own that is not the run_mechanism (a
	// site preparing a switch): its version, and whether it works.
	for _, name := range []string{config.MechanismCharliecloud, config.MechanismApptainer} {
		if name != cfg.General.RunMechanism && tableRE(name).MatchString(doc) {
			probeOther(ctx, r, cfg, name, u)
		}
	}
	if cfg.IsBatch() {
		checkSlurm(ctx, r, cfg)
	}
	checkJWKS(ctx, r, cfg)
	checkDownscope(r, cfg)
	return r
}

// checkDownscope checks a downscoping runner's own needs (root or the
// capabilities, state_dir, audit trail).
func checkDownscope(r *Report, cfg *config.Config) {
	if !cfg.Auth.Downscoping() {
		return
	}
	errs := downscope.Preflight(cfg)
	for _, err := range errs {
		r.add(Check{Area: "auth", Status: Fail, Key: "auth.downscope", Message: oneLine(err.Error()),
			Fix: "see docs/multi-tenant.md, \"Deploying\""})
	}
	if len(errs) == 0 {
		r.ok("auth", "downscoping: can switch to job users; state_dir %s and audit_log %s usable", cfg.Auth.StateDir, cfg.Auth.AuditLog)
	}
}

// tableRE matches the [general.<name>] header of a TOML document.
func tableRE(name string) *regexp.Regexp {
	return regexp.MustCompile(`(?m)^\s*\[\s*general\.` + name + `\s*\]`)
}

func checkConfig(r *Report, path string, u config.UserInfo) (*config.Config, string) {
	b, err := os.ReadFile(path)
	if err != nil {
		r.add(Check{Area: "config", Status: Fail, Message: fmt.Sprintf("cannot read %s: %v", path, err),
			Fix: "create it (configs/ci-exec.toml is an example), make it readable by the job user, or pass --config PATH"})
		return nil, ""
	}
	cfg, probs := config.Diagnose(string(b), u)
	// In file order; problems without a line last.
	sort.SliceStable(probs, func(i, k int) bool {
		li, lk := probs[i].Line, probs[k].Line
		return li != 0 && (lk == 0 || li < lk)
	})
	for _, p := range probs {
		r.add(Check{Area: "config", Status: Fail, Message: p.Message, Key: p.Key, Line: p.Line})
	}
	if cfg == nil {
		return nil, ""
	}
	if len(probs) == 0 {
		mech := cfg.General.RunMechanism
		if mech == "" {
			mech = "host"
		}
		r.ok("config", "%s is valid (executor %s, run_mechanism %s)", path, cfg.General.Executor, mech)
		for _, name := range cfg.ProfileNames() {
			// What jobs may put in CI_EXEC_PROFILE.
			r.ok("profiles", "profile %s: %s", name, cmp.Or(cfg.Profiles[name].Description, "(no description)"))
		}
	}
	return cfg, string(b)
}

// runAs re-runs `ci-exec check` as user when that is someone else: root
// becomes the user (uid, gid, groups, HOME, USER), so every probe and
// directory check meets exactly what that user's jobs meet.
func runAs(ctx context.Context, name, configPath string, asJSON bool, stdout, stderr io.Writer) (int, bool) {
	u, err := user.Lookup(name)
	if err != nil {
		fmt.Fprintf(stderr, "ERROR: ci-exec check --as %s: %v\n", name, err)
		return 2, true
	}
	if u.Uid == strconv.Itoa(os.Getuid()) {
		return 0, false
	}
	if os.Getuid() != 0 {
		fmt.Fprintf(stderr, "ERROR: ci-exec check --as %s: only root can check as another user; run it as root or as %s\n", name, name)
		return 2, true
	}
	uid, _ := strconv.ParseUint(u.Uid, 10, 32)
	gid, _ := strconv.ParseUint(u.Gid, 10, 32)
	var groups []uint32
	if ids, err := u.GroupIds(); err == nil {
		for _, g := range ids {
			if n, err := strconv.ParseUint(g, 10, 32); err == nil {
				groups = append(groups, uint32(n))
			}
		}
	}
	if abs, err := filepath.Abs(configPath); err == nil {
		configPath = abs
	}
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintf(stderr, "ERROR: ci-exec check --as: %v\n", err)
		return 2, true
	}
	args := []string{"--config", configPath, "check"}
	if asJSON {
		args = append(args, "--json")
	}
	cmd := exec.CommandContext(ctx, self, args...)
	var env []string
	for _, kv := range os.Environ() {
		switch k, _, _ := bytes.Cut([]byte(kv), []byte("=")); string(k) {
		case "HOME", "USER", "LOGNAME":
		default:
			env = append(env, kv)
		}
	}
	cmd.Env = append(env, "HOME="+u.HomeDir, "USER="+u.Username, "LOGNAME="+u.Username)
	cmd.Dir = "/"
	cmd.Stdout, cmd.Stderr = stdout, stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: groups}}
	if err := cmd.Run(); err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode(), true
		}
		fmt.Fprintf(stderr, "ERROR: ci-exec check --as %s: %v\n", name, err)
		return 2, true
	}
	return 0, true
}
