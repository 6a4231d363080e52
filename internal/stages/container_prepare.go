package stages

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/job"
	"github.com/ci-exec/ci-exec/internal/joblog"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/policy"
	"github.com/ci-exec/ci-exec/internal/proc"
)

// containerSetup is everything Prepare and containerCommand need about one job.
type containerSetup struct {
	Runtime mechanism.Runtime
	// Cfg is the runtime's [general.<name>] table.
	Cfg config.Mechanism
	// Batch is true for batch executors (images are converted to a file).
	Batch bool
	// Force is force_mechanism (default_image for jobs without one).
	Force  bool
	Job    *job.Job
	Layout job.Layout
	// User is the job user (HOME, USER inside containers).
	User config.UserInfo
	Log  *joblog.Logger
	// HostEnv is the environment host scripts get (for prep_script and for
	// the pass_env lookup).
	HostEnv map[string]string
	// ScriptEnv is the environment for prep_script.
	ScriptEnv []string
	// Grace is kill_timeout.
	Grace time.Duration
	// saveState keeps prepare's result (Stage.saveState).
	saveState func(*State) error
	// Site is the job's profile, limits and GPU; siteErr why they cannot
	// apply (an unknown profile, a request above a cap), returned by every
	// stage but cleanup.
	Site    jobSite
	siteErr error
	// Services is the [services] table; keep tells a downscoping front
	// which processes (the job's services) must outlive the stage.
	Services  config.Services
	keep      func(pid int)
	loadState func() (*State, error)
	// Table names the runtime's table in messages (config.MechanismTable).
	Table string
}

func (s containerSetup) key(k string) string { return s.table() + "." + k }

// table is "general.<runtime>", or "runtimes.NAME" for a template.
func (s containerSetup) table() string {
	if s.Table != "" {
		return s.Table
	}
	return "general." + s.Runtime.Name()
}

// Placement returns the stage placement policy for state.
func (s containerSetup) Placement(st *State) policy.PlacementPolicy {
	return policy.PlacementPolicy{
		HasJobImage:    st != nil && st.Job != nil,
		HasRunnerImage: st != nil && st.Runner != nil,
		StepScriptOnly: s.Cfg.StepScriptOnly,
	}
}

// Prepare resolves, checks and pulls the job's image (and runner_image) and
// saves the result in the job's scripts dir. The order is deliberate:
// everything the user controls (image name, allowlist, volumes, arguments,
// credentials) is checked before the admin's prep_script and before any
// runtime command or network access, so a refused job costs nothing and
// leaves nothing behind.
func prepareContainer(ctx context.Context, s containerSetup) (*State, error) {
	rt := s.Runtime
	st := &State{Mechanism: rt.Name()}
	if s.siteErr != nil {
		return nil, s.siteErr
	}
	given, admin := s.Job.Image(), false
	if given == "" {
		switch {
		case !s.Force:
			// prep_script runs in every prepare, as Jacamar's does in
			// prepare_exec: the admin's hook for the user's directories and
			// configuration does not depend on the job naming an image.
			if _, _, err := s.jobServices(nil); err != nil {
				return nil, err
			}
			if err := s.runPrepScript(ctx, policy.Ref{}); err != nil {
				return nil, err
			}
			s.Log.Printf("The job names no image: its scripts run on the host.")
			return st, s.saveState(st)
		case s.Cfg.DefaultImage == "":
			// As in Jacamar, force_mechanism without default_image is valid
			// and such a job fails; it never falls back to the host.
			return nil, failure.Userf("the job names no image, and this runner runs every job in a container (general.force_mechanism) with no %s; add an image: to the job, or ask the admin to set default_image",
				s.key("default_image"))
		}
		given, admin = s.Cfg.DefaultImage, true
		s.Log.Printf("The job names no image: using the default image %s (force_mechanism).", given)
	}
	ref, err := policy.ParseImage(given)
	if err != nil {
		if admin {
			return nil, failure.Systemf("%s: %v", s.key("default_image"), err)
		}
		return nil, err
	}
	if !admin {
		// The admin's own default_image and runner_image are trusted and
		// not subject to the allowlist.
		allow, err := policy.NewAllowlist(s.Cfg.ImageAllowlist)
		if err != nil {
			return nil, failure.AsSystem(err)
		}
		allow.Key = s.key("image_allowlist")
		if err := allow.Check(ref); err != nil {
			return nil, err
		}
	}
	// Volumes and user arguments are checked here, before anything is
	// pulled, and again in every stage (nothing of them is kept).
	if _, err := s.volumePolicy().UserVolumes(s.Job.Vars); err != nil {
		return nil, err
	}
	_, notice, err := s.userArgsPolicy().UserArgs(s.Job.Vars)
	if err != nil {
		return nil, err
	}
	if notice != "" {
		s.Log.Warnf("%s", notice)
	}
	svcSpecs, svcRefs, err := s.jobServices(&ref)
	if err != nil {
		return nil, err
	}
	// The user's own registry variables are for the image they named; the
	// admin's default image gets the job token (same registry) or nothing.
	names := rt.CredentialVariables()
	if admin {
		names = auth.VariableNames{}
	}
	cred, err := auth.Choose(s.Job, ref.Registry, names)
	if err != nil {
		return nil, err
	}
	// A user's password may come from an unmasked variable: mask it anyway
	// in whatever the pull tool prints.
	s.Log.AddSecrets(cred.Password())

	var runnerRef *policy.Ref
	var runnerCred auth.Credential
	switch {
	case s.Cfg.RunnerImage != "" && s.Cfg.StepScriptOnly:
		s.Log.Printf("runner_image is not used: step_script_only keeps the runner's stages on the host.")
	case s.Cfg.RunnerImage != "":
		r, err := policy.ParseImage(s.Cfg.RunnerImage)
		if err != nil {
			return nil, failure.Systemf("%s: %v", s.key("runner_image"), err)
		}
		runnerRef = &r
		// The user's own credentials are for their image only; the admin's
		// runner image gets the job token (same registry) or nothing.
		if runnerCred, err = auth.Choose(s.Job, r.Registry, auth.VariableNames{}); err != nil {
			return nil, err
		}
	}

	if err := s.runPrepScript(ctx, ref); err != nil {
		return nil, err
	}

	info, err := rt.Probe(ctx)
	if err != nil {
		return nil, err
	}
	s.Log.Printf("Using %s", info.Describe(rt.Name()))
	vols, err := s.UserVolumes(info)
	if err != nil {
		return nil, err
	}
	if err := s.applySite(&mechanism.RunSpec{}, info, true); err != nil {
		return nil, err
	}
	vols = append(vols, s.Site.Binds...)

	mounts := s.mountPoints(vols)
	if st.Job, err = s.pull(ctx, ref, cred, s.Cfg.PullPolicy, "", mounts); err != nil {
		return nil, err
	}
	if runnerRef != nil {
		if st.Runner, err = s.pull(ctx, *runnerRef, runnerCred, s.Cfg.RunnerPullPolicy, "-runner", s.mountPoints(nil)); err != nil {
			return nil, failure.AsSystem(fmt.Errorf("%s: %w", s.key("runner_image"), err))
		}
	}
	if err := s.startServices(ctx, st, info, svcSpecs, svcRefs); err != nil {
		// Nothing of a failed prepare stays running: the runner retries
		// prepare after a system failure, and the retry must not meet
		// this attempt's services on their ports.
		s.stopServices(context.WithoutCancel(ctx), st)
		st.Services = nil
		_ = s.saveState(st)
		return nil, err
	}
	if err := s.saveState(st); err != nil {
		return nil, failure.AsSystem(err)
	}
	return st, nil
}

// pull pulls one image and converts it when the executor or the admin asks.
func (s containerSetup) pull(ctx context.Context, ref policy.Ref, cred auth.Credential, pullPolicy, role string, mounts []string) (*mechanism.Image, error) {
	rt := s.Runtime
	s.Log.Printf("Pulling %s (pull policy %s, credentials: %s)", ref.Full, pullPolicy, cred)
	img, err := rt.Pull(ctx, mechanism.PullRequest{
		Ref:         ref,
		Policy:      pullPolicy,
		Credential:  cred,
		Insecure:    policy.MatchRegistry(s.Cfg.InsecureRegistries, ref.Registry),
		JobKey:      s.jobKey() + role,
		MountPoints: mounts,
		Dir:         s.Layout.StateDir,
		SingleFile:  (s.Batch || s.Cfg.Convert) && !s.Cfg.DisableConvert,
		GPU:         role == "" && s.Site.GPU, // the job's own image only
		Log:         s.Log,
	})
	if err != nil {
		return nil, err
	}
	s.Log.Printf("Image %s: %s", ref.Full, Readiness(img))
	if ev, ok := rt.(mechanism.Evicter); ok {
		// The job's own image has its lease already: it is never evicted.
		removed, err := ev.Evict(ctx)
		if err != nil {
			s.Log.Warnf("image store eviction: %v", err)
		}
		for _, e := range removed {
			s.Log.Printf("Evicted %s from your image store (%.1f MiB, %s).", e.Key, float64(e.Size)/(1<<20), e.Reason)
		}
	}
	if filepath.Base(img.Shell) != "bash" {
		s.Log.Printf("%s has no bash: stage scripts run with %s", ref.Full, img.Shell)
	}
	return &img, nil
}

// mountPoints are the container paths binds need: the data dir and the
// user volumes' destinations.
func (s containerSetup) mountPoints(vols []policy.Bind) []string {
	out := []string{s.Layout.DataDir}
	for _, v := range vols {
		out = append(out, v.Dst)
	}
	return out
}

// jobKey is unique per job: the job id plus a hash of its scripts dir
// (which holds the runner and the concurrency slot), lowercase so any
// runtime accepts it as an image name.
func (s containerSetup) jobKey() string {
	h := sha256.Sum256([]byte(s.Layout.ScriptsDir))
	return "j" + strconv.FormatInt(s.Job.ID(), 10) + "-" + hex.EncodeToString(h[:5])
}

func (s containerSetup) volumePolicy() policy.VolumePolicy {
	return policy.VolumePolicy{Table: s.table(), Variable: s.Cfg.UserVolumeVariable, Prefixes: s.Cfg.VolumePrefixes, ReadOnlySupported: true}
}

func (s containerSetup) userArgsPolicy() policy.UserArgsPolicy {
	rt := s.Runtime
	return policy.UserArgsPolicy{
		Variable: rt.UserArgsVariable(),
		Disabled: s.Cfg.DisableUserArgs,
		Allowed:  s.Cfg.AllowedUserArgs,
		Default:  rt.DefaultUserArgs(),
		Flags:    rt.RunFlags(),
		Key:      s.key("allowed_user_args"),
	}
}

// runPrepScript runs the admin's prep_script on the host as the job user,
// before any runtime command; CI_EXEC_IMAGE is empty for a job that runs on
// the host. Its failure is a system failure: the admin's script broke, not
// the job.
func (s containerSetup) runPrepScript(ctx context.Context, ref policy.Ref) error {
	script := s.Cfg.PrepScript
	if script == "" {
		return nil
	}
	env := append([]string(nil), s.ScriptEnv...)
	env = append(env, "CI_EXEC_MECHANISM="+s.Runtime.Name(), "CI_EXEC_IMAGE="+ref.Full)
	if pe, ok := s.Runtime.(mechanism.PrepEnver); ok {
		env = append(env, pe.PrepEnv()...)
	}
	cmd := proc.Cmd{Argv: []string{script}, Env: env, Dir: s.Layout.ScriptsDir, Grace: s.Grace}
	if s.Cfg.PrepScriptSHA256 != "" {
		f, err := s.openPinnedPrepScript()
		if err != nil {
			return err
		}
		defer f.Close()
		// The child runs the file that was hashed: its descriptor 3, not
		// the path, which may have been replaced since (as auth.runas).
		cmd.Argv, cmd.ExtraFiles = []string{"/proc/self/fd/3"}, []*os.File{f}
	}
	end := s.Log.Section("prep_script", "Running the admin's prep_script "+script, false)
	w := s.Log.Writer()
	cmd.Stdout, cmd.Stderr = w, w
	res, err := proc.Run(ctx, cmd)
	w.Close()
	end()
	switch {
	case err != nil:
		return failure.Systemf("%s %s could not be run: %v (the admin must make it an executable file)", s.key("prep_script"), script, err)
	case res.ExitCode != 0:
		return failure.Systemf("%s %s failed with exit code %d (see its output above); the runner will retry", s.key("prep_script"), script, res.ExitCode)
	}
	return nil
}

// openPinnedPrepScript opens prep_script once and checks the open file
// against prep_script_sha256. A mismatch is a system failure naming both
// hashes: the admin changed the script without updating the pin (or someone
// else changed it), and a job must not run what nobody vetted.
func (s containerSetup) openPinnedPrepScript() (*os.File, error) {
	script := s.Cfg.PrepScript
	f, err := os.Open(script)
	if err != nil {
		return nil, failure.Systemf("%s %s could not be opened: %v (the admin must make it a readable file)", s.key("prep_script"), script, err)
	}
	fi, err := f.Stat()
	if err == nil && !fi.Mode().IsRegular() {
		err = fmt.Errorf("not a regular file (mode %s)", fi.Mode())
	}
	h := sha256.New()
	if err == nil {
		_, err = io.Copy(h, f)
	}
	if err != nil {
		f.Close()
		return nil, failure.Systemf("%s %s: %v", s.key("prep_script"), script, err)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != s.Cfg.PrepScriptSHA256 {
		f.Close()
		return nil, failure.Systemf("%s %s has SHA-256 %s, not the pinned %s %s: refusing to run it (the admin must update the pin if the change is theirs)",
			s.key("prep_script"), script, got, s.key("prep_script_sha256"), s.Cfg.PrepScriptSHA256)
	}
	return f, nil
}

// Readiness is the job-log summary of how an image became ready: the
// store's hit or miss, the digest, the format, and the time spent pulling
// and converting.
func Readiness(img mechanism.Image) string {
	digest := img.Digest
	if digest == "" {
		digest = "unknown"
	}
	msg := fmt.Sprintf("digest %s, %s", digest, img.Format)
	switch img.Cache {
	case "":
	case "miss":
		msg += ", cache miss"
	default:
		msg += ", cache " + img.Cache
	}
	if img.PullTime > 0 {
		msg += fmt.Sprintf(", pulled in %.2fs", img.PullTime.Seconds())
	}
	if img.ConvertTime > 0 {
		msg += fmt.Sprintf(", converted in %.2fs", img.ConvertTime.Seconds())
	}
	return msg + fmt.Sprintf(", ready in %.2fs", img.ReadyTime.Seconds())
}
