// Package downscope is the privileged front of a runner that serves every
// user of a centre (auth.downscope = "setuid"): for each stage it verifies
// who the job belongs to, decides the local account, creates that user's
// data_dir where only it can, and starts the stage itself as the user
// (ci-exec as-user: uid, primary and supplementary groups, a clean
// environment). Everything else — container runtimes, registries, image
// unpacking, the job's scripts, Slurm — happens in that unprivileged child.
//
// What steers a job's later stages (the verified identity, prepare's
// result) stays in auth.state_dir, which belongs to the runner's account,
// keyed by the job id from the runner's JOB_RESPONSE_FILE, and reaches the
// child through a pipe (see Handoff). One audit record per stage goes to
// syslog or a JSON-lines file (package audit).
package downscope

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ci-exec/ci-exec/internal/audit"
	"github.com/ci-exec/ci-exec/internal/authz"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/idtoken"
	"github.com/ci-exec/ci-exec/internal/job"
	"github.com/ci-exec/ci-exec/internal/joblog"
	"github.com/ci-exec/ci-exec/internal/proc"
)

// Stage names.
const (
	StageConfig  = "config"
	StagePrepare = "prepare"
	StageRun     = "run"
	StageCleanup = "cleanup"
)

// Files in a job's state dir.
const (
	identityFile = "identity.json"
	stateFile    = "state.json"
)

// Call is one stage call from the runner, as the front sees it.
type Call struct {
	Stage string
	// ScriptPath and ScriptStage are the run stage's last two arguments.
	ScriptPath, ScriptStage string
	// Cfg is the config as loaded by the front (its own $USER/$HOME: only
	// the auth settings and pass_env are used); Doc is the document, parsed
	// again for the job user.
	Cfg        *config.Config
	Doc        string
	ConfigPath string
	Job        *job.Job
	Environ    []string
	Stdout     io.Writer
	Stderr     io.Writer
	Log        *joblog.Logger
	// Version is this build's (the child must match).
	Version string
}

// Outcome is how the user's stage ended.
type Outcome struct {
	// Exit is the child's exit code: the runner's contract codes.
	Exit int
	// ScriptCode is for the runner's BUILD_EXIT_CODE_FILE.
	ScriptCode *int
}

// identity is what the config stage verified, kept for the later stages:
// the token's claims and the account they were resolved to.
type identity struct {
	Claims  idtoken.Claims `json:"claims"`
	Account string         `json:"account"`
	UID     int            `json:"uid"`
	Via     string         `json:"via"`
}

var errNoIdentity = errors.New("no verified identity")

// Run runs one stage as the job's user. Errors are classified (package
// failure): a denial is a build failure, an infrastructure fault a system
// failure.
func Run(ctx context.Context, c Call) (Outcome, error) {
	f := &front{Call: c, rec: audit.Record{Stage: c.Stage, Server: c.Cfg.General.GitlabServer, UID: -1, Exit: -1}}
	out, err := f.run(ctx)
	if f.audit != nil {
		if err != nil {
			f.rec.Decision, f.rec.Reason = "deny", err.Error()
			if failure.ClassOf(err) != failure.User {
				f.rec.Decision = "error"
			}
		} else if f.rec.Decision == "" {
			f.rec.Decision = "allow"
		}
		f.audit.Write(ctx, f.rec)
		f.audit.Close()
	}
	return out, err
}

type front struct {
	Call
	rec   audit.Record
	audit *audit.Log
	root  stateRoot
	id    int64
}

func (f *front) run(ctx context.Context) (Outcome, error) {
	a, g := &f.Cfg.Auth, &f.Cfg.General
	var err error
	if f.audit, err = audit.Open(a.AuditLog); err != nil {
		return Outcome{}, failure.AsSystem(err)
	}
	priv, err := checkPrivilege()
	if err != nil {
		return Outcome{}, failure.AsSystem(err)
	}
	r := f.Job.Response
	if r == nil || r.ID <= 0 {
		return Outcome{}, failure.Systemf("auth.downscope = \"setuid\" needs the runner's JOB_RESPONSE_FILE for the job's id; this runner gave none")
	}
	f.id = r.ID
	f.rec.JobID, f.rec.Project = r.ID, r.JobInfo.ProjectFullPath
	if f.root, err = openStateRoot(a.StateDir); err != nil {
		return Outcome{}, failure.AsSystem(err)
	}

	var id *identity
	if f.Stage == StageConfig {
		f.root.sweep(time.Now())
		claims, err := f.verifier().Verify(ctx, f.Job.Vars[g.JWTEnvVariable], strconv.FormatInt(f.id, 10))
		if err != nil {
			return Outcome{}, err
		}
		id = &identity{Claims: *claims}
	} else if id, err = f.loadIdentity(); err != nil {
		if f.Stage == StageCleanup && errors.Is(err, errNoIdentity) {
			// The job was refused (or never configured) here: nothing ran
			// as anyone, so there is nothing to clean up.
			f.rec.Decision, f.rec.Reason = "none", "no verified identity: nothing to clean up"
			return Outcome{}, nil
		}
		return Outcome{}, err
	}
	f.rec.Login, f.rec.Project, f.rec.PipelineID = id.Claims.UserLogin, id.Claims.ProjectPath, id.Claims.PipelineID

	acct, via, err := f.decide(ctx, id)
	if err != nil {
		return Outcome{}, err
	}
	f.rec.User, f.rec.UID = acct.Name, acct.UID
	f.rec.Reason = fmt.Sprintf("GitLab user %q runs as %q (uid %d) by %s", id.Claims.UserLogin, acct.Name, acct.UID, via)
	if f.Stage == StageConfig {
		id.Account, id.UID, id.Via = acct.Name, acct.UID, via
		b, _ := json.Marshal(id)
		if err := f.root.write(f.id, identityFile, b); err != nil {
			return Outcome{}, failure.Systemf("record the job's verified identity in auth.state_dir: %v", err)
		}
	}

	// The job user's own view of the config ($USER, $HOME are theirs).
	userCfg, err := config.Parse(f.Doc, config.UserInfo{Name: acct.Name, Home: acct.Home})
	if err != nil {
		return Outcome{}, failure.Systemf("config %s for user %s: %v (fix the ci-exec configuration; the runner will retry)", f.ConfigPath, acct.Name, err)
	}
	if f.Stage == StageConfig {
		if err := ensureDataDir(userCfg.General.DataDir, acct, priv); err != nil {
			return Outcome{}, failure.AsSystem(err)
		}
	}
	if f.Stage == StagePrepare {
		f.Log.Noticef("GitLab user %s (verified ID token) runs as local account %s (uid %d)", id.Claims.UserLogin, acct.Name, acct.UID)
	}

	var state []byte
	if f.Stage == StageRun || f.Stage == StageCleanup {
		state, err = f.root.read(f.id, stateFile)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return Outcome{}, failure.Systemf("read the job's prepare state: %v", err)
		}
	}
	out, res, err := f.spawn(ctx, acct, id, state)
	if res != nil {
		f.rec.Image, f.rec.Digest, f.rec.Slurm = res.Image, res.Digest, res.Slurm
		// Prepare writes the state; a run stage may update it (a Slurm
		// allocation that ended). Cleanup's is dropped with the job.
		if (f.Stage == StagePrepare || f.Stage == StageRun) && len(res.State) > 0 {
			if err := f.root.write(f.id, stateFile, res.State); err != nil {
				return out, failure.Systemf("keep the job's prepare state in auth.state_dir: %v", err)
			}
		}
	}
	if f.Stage == StageCleanup {
		if rmErr := f.root.remove(f.id); rmErr != nil {
			f.Log.Warnf("cleanup: remove the job's state in auth.state_dir: %v", rmErr)
		}
	}
	if err == nil {
		f.rec.Exit = out.Exit
	}
	return out, err
}

func (f *front) verifier() *idtoken.Verifier {
	a, g := &f.Cfg.Auth, &f.Cfg.General
	var keys idtoken.KeySource = idtoken.FileKeys{Path: a.JWKSFile}
	if a.JWKSFile == "" {
		keys = &idtoken.HTTPKeys{URL: idtoken.ServerKeysURL(g.GitlabServer), CacheFile: f.root.jwksCache(), TTL: a.JWKSTTL.Duration}
	}
	return &idtoken.Verifier{Issuer: g.GitlabServer, Audience: a.JWTAudience, Variable: g.JWTEnvVariable, Keys: keys}
}

func (f *front) loadIdentity() (*identity, error) {
	b, err := f.root.read(f.id, identityFile)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, &failure.Error{Class: failure.System, Err: fmt.Errorf("%w for job %d in auth.state_dir %s: its config stage did not run on this host, or the state was removed; the runner will retry", errNoIdentity, f.id, f.root)}
	}
	if err != nil {
		return nil, failure.Systemf("read the job's verified identity: %v", err)
	}
	var id identity
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&id); err != nil || id.Account == "" {
		return nil, failure.Systemf("the job's verified identity in %s is unreadable (%v)", f.root.jobDir(f.id), err)
	}
	return &id, nil
}

// decide resolves the account. The config stage decides; the later stages
// decide again from the recorded claims (an admin's new blocklist entry
// stops the rest of a job) and must get the same account. Cleanup always
// runs as the recorded account while it still has the recorded uid: ending
// the job's processes and removing its files must not depend on the rules.
func (f *front) decide(ctx context.Context, id *identity) (*authz.Account, string, error) {
	d := &authz.Decider{Auth: f.Cfg.Auth, Accounts: authz.OSAccounts{}, RunAs: authz.Script{Conf: f.Cfg.Auth.RunAs}}
	requested := ""
	if v := f.Cfg.Auth.RunAs.UserVariable; v != "" {
		requested = f.Job.Vars[v]
	}
	if f.Stage == StageCleanup {
		acct, err := d.Accounts.Lookup(id.Account)
		if err != nil {
			return nil, "", failure.Systemf("cleanup: look up %s: %v", id.Account, err)
		}
		if acct.UID != id.UID {
			return nil, "", failure.Systemf("cleanup: account %s now has uid %d, not %d as when the job started; not cleaning up as it", id.Account, acct.UID, id.UID)
		}
		return acct, id.Via, nil
	}
	dec, err := d.Decide(ctx, &id.Claims, requested)
	if err != nil {
		return nil, "", err
	}
	if f.Stage != StageConfig && (dec.Account.Name != id.Account || dec.Account.UID != id.UID) {
		return nil, "", failure.Systemf("the job started as %s (uid %d) but would now run as %s (uid %d); refusing to switch accounts mid-job", id.Account, id.UID, dec.Account.Name, dec.Account.UID)
	}
	return &dec.Account, dec.Via, nil
}

// userExecutable is what the child runs: auth.user_executable, else this
// very binary (root deployments; see docs/multi-tenant.md for setcap).
func (f *front) userExecutable() (string, error) {
	if p := f.Cfg.Auth.UserExecutable; p != "" {
		return p, nil
	}
	exe, err := os.Executable()
	if err != nil {
		return "", failure.Systemf("find ci-exec's own executable: %v", err)
	}
	return exe, nil
}

// spawn runs ci-exec as-user as acct and collects its result.
func (f *front) spawn(ctx context.Context, acct *authz.Account, id *identity, state []byte) (Outcome, *Result, error) {
	exe, err := f.userExecutable()
	if err != nil {
		return Outcome{}, nil, err
	}
	h := Handoff{Version: f.Version, Stage: f.Stage, ScriptStage: f.ScriptStage, Config: f.Doc, ConfigPath: f.ConfigPath,
		Response: f.Job.Response, State: state, UID: acct.UID, Account: acct.Name, GitLabUser: id.Claims.UserLogin}
	doc, err := json.Marshal(h)
	if err != nil {
		return Outcome{}, nil, failure.Systemf("encode the handoff: %v", err)
	}
	hr, hw, err := os.Pipe()
	if err != nil {
		return Outcome{}, nil, failure.AsSystem(err)
	}
	rr, rw, err := os.Pipe()
	if err != nil {
		hr.Close()
		hw.Close()
		return Outcome{}, nil, failure.AsSystem(err)
	}
	files := []*os.File{hr, rw}
	if f.Stage == StageRun {
		// Opened here, read there: the runner's script is in its 0700
		// temp dir, which the user cannot enter.
		sf, err := os.Open(f.ScriptPath)
		if err != nil {
			hr.Close()
			hw.Close()
			rr.Close()
			rw.Close()
			return Outcome{}, nil, failure.Systemf("open the runner's script: %v", err)
		}
		defer sf.Close()
		files = append(files, sf)
	}
	go func() {
		// A child that dies before reading ends this with EPIPE.
		_, _ = hw.Write(doc)
		hw.Close()
	}()
	type read struct {
		b   []byte
		err error
	}
	got := make(chan read, 1)
	go func() {
		b, err := io.ReadAll(io.LimitReader(rr, maxResult+1))
		rr.Close()
		got <- read{b, err}
	}()
	gids := acct.GIDs
	if len(gids) == 0 {
		gids = []uint32{uint32(acct.GID)}
	}
	var r read
	haveResult := false
	res, runErr := proc.Run(ctx, proc.Cmd{
		Argv:   []string{exe, AsUserCommand},
		Env:    childEnv(f.Environ, f.Cfg, acct),
		Dir:    "/",
		Stdout: f.Stdout,
		Stderr: f.Stderr,
		// The child stops its own commands within kill_timeout when the
		// runner's SIGTERM reaches it (forwarded from ours); the runner's
		// SIGKILL comes after graceful_kill_timeout anyway.
		Grace:      f.Cfg.General.KillTimeout.Duration + 10*time.Second,
		ExtraFiles: files,
		Credential: &syscall.Credential{Uid: uint32(acct.UID), Gid: uint32(acct.GID), Groups: gids},
		// The child's result names the processes it started to outlive it
		// (a job's services): they are not its leftovers.
		Keep: func() []int {
			rw.Close()
			r, haveResult = <-got, true
			var rs Result
			if r.err != nil || len(r.b) > maxResult || json.Unmarshal(r.b, &rs) != nil {
				return nil
			}
			// A parent that runs this front through proc.Run (ci-exec
			// exec) must keep them too.
			if kf := envValue(f.Environ, proc.KeepFileVariable); filepath.IsAbs(kf) {
				for _, pid := range rs.Keep {
					_ = proc.AppendKeepFile(kf, pid)
				}
			}
			return rs.Keep
		},
	})
	hr.Close()
	rw.Close()
	if !haveResult {
		r = <-got
	}
	if runErr != nil {
		var se *proc.StartError
		if errors.As(runErr, &se) {
			return Outcome{}, nil, failure.Systemf("start the %s stage as %s: %v (the user must be able to run %s; see auth.user_executable)", f.Stage, acct.Name, se.Err, exe)
		}
		return Outcome{}, nil, failure.Systemf("the %s stage as %s: %v", f.Stage, acct.Name, runErr)
	}
	if left := proc.Summary(res.LeftBehind); left != "" && len(res.LeftBehind) > 0 {
		f.Log.Printf("%s", left)
	}
	var result *Result
	if r.err == nil && len(r.b) > 0 && len(r.b) <= maxResult {
		var rs Result
		if json.Unmarshal(r.b, &rs) == nil {
			result = &rs
		}
	}
	if res.Signaled {
		return Outcome{}, result, failure.Systemf("the %s stage running as %s was ended by signal %v", f.Stage, acct.Name, res.Signal)
	}
	if result == nil {
		// The child always reports unless it failed before its stage ran
		// (it said why on stderr).
		return Outcome{Exit: res.ExitCode}, nil, nil
	}
	out := Outcome{Exit: res.ExitCode}
	if c := result.ScriptCode; c != nil && *c >= 0 && *c <= 255 {
		out.ScriptCode = c
	}
	return out, result, nil
}

// childEnv is the user stage's environment: what the runner gives every
// stage of the job (its contract variables, job_env, the job's
// CUSTOM_ENV_ variables), the part of the runner's own environment the
// admin passes to jobs (pass_env), and the user's identity. Nothing else
// of the runner's account reaches a process the user can inspect; the
// runner-only paths (TMPDIR, JOB_RESPONSE_FILE, BUILD_EXIT_CODE_FILE) are
// replaced by the handoff.
func childEnv(environ []string, cfg *config.Config, a *authz.Account) []string {
	var out []string
	for _, kv := range environ {
		k, _, ok := strings.Cut(kv, "=")
		if !ok {
			continue
		}
		switch {
		case strings.HasPrefix(k, job.CustomEnvPrefix),
			k == "BUILD_FAILURE_EXIT_CODE", k == "SYSTEM_FAILURE_EXIT_CODE",
			strings.HasPrefix(k, "CI_EXEC_") && k != "CI_EXEC_CONFIG":
			out = append(out, kv)
		case k == "HOME", k == "USER", k == "LOGNAME", k == "SHELL", k == "TMPDIR",
			k == "JOB_RESPONSE_FILE", k == "BUILD_EXIT_CODE_FILE":
		case config.MatchAny(cfg.General.PassEnv, k):
			out = append(out, kv)
		}
	}
	return append(out, "HOME="+a.Home, "USER="+a.Name, "LOGNAME="+a.Name, "SHELL="+a.Shell)
}

// StateDirOf is the job's state dir under a config's auth.state_dir (for
// tests and `ci-exec check`).
func StateDirOf(cfg *config.Config, jobID int64) string {
	return stateRoot(filepath.Clean(cfg.Auth.StateDir)).jobDir(jobID)
}

// Preflight checks what a downscoping runner needs before any job comes
// (for `ci-exec check`): the power to switch users, a trusted state_dir,
// and a writable audit trail. Each problem is one error with its fix.
func Preflight(cfg *config.Config) []error {
	var errs []error
	if _, err := checkPrivilege(); err != nil {
		errs = append(errs, err)
	}
	if _, err := openStateRoot(cfg.Auth.StateDir); err != nil {
		errs = append(errs, err)
	}
	if l, err := audit.Open(cfg.Auth.AuditLog); err != nil {
		errs = append(errs, err)
	} else {
		l.Close()
	}
	if p := cfg.Auth.UserExecutable; p != "" {
		if fi, err := os.Stat(p); err != nil || fi.Mode().Perm()&0o001 == 0 {
			errs = append(errs, fmt.Errorf("auth.user_executable %s must exist and be executable by every job user (mode 0755)", p))
		}
	}
	return errs
}

// envValue is KEY's value in a KEY=VALUE list ("" when absent).
func envValue(env []string, key string) string {
	for _, kv := range env {
		if k, v, ok := strings.Cut(kv, "="); ok && k == key {
			return v
		}
	}
	return ""
}
