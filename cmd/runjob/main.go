// Command runjob runs one job through a custom-executor driver the way
// gitlab-runner does, using the internal/runnerdouble test double. It is for
// demos and for humans trying the driver without a GitLab instance.
//
//	runjob --driver PATH --config CI_EXEC_CONFIG_PATH [--image REF] [--user NAME]
//	       [--timeout 30s] [--var K=V]... [--masked-var K=V]... [--after 'cmd']...
//	       -- 'script line' 'script line'...
//
// The job log is printed live to stdout, then a summary line
//
//	job finished: state=success failure_reason= exit_code=0
//
// runjob exits 0 when the job succeeded, 1 when it failed and 2 on usage or
// test-double errors. The first SIGINT/SIGTERM cancels the job like the
// GitLab UI does (after_script and cleanup still run); a second one aborts.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"os/user"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ci-exec/ci-exec/internal/runnerdouble"
)

// multiFlag is a repeatable string flag.
type multiFlag []string

func (m *multiFlag) String() string { return strings.Join(*m, ",") }

func (m *multiFlag) Set(v string) error {
	*m = append(*m, v)
	return nil
}

type options struct {
	driver, config, image, userName, project, registry, gitStrategy string
	buildsDir, cacheDir                                             string
	timeout, graceful, force                                        time.Duration
	vars, masked, after, steps, env                                 multiFlag
	jobID                                                           int64
	concurrentID                                                    int
	keepTemp, debug                                                 bool
	script                                                          []string
}

func parseFlags(args []string, stderr io.Writer) (*options, error) {
	o := &options{}
	fs := flag.NewFlagSet("runjob", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.driver, "driver", "", "path of the driver binary (required)")
	fs.StringVar(&o.config, "config", "", "passed as --config PATH before every stage subcommand")
	fs.StringVar(&o.image, "image", "", "job image (CI_JOB_IMAGE)")
	fs.StringVar(&o.userName, "user", "", "run every driver call as this user")
	fs.DurationVar(&o.timeout, "timeout", time.Hour, "job timeout")
	fs.DurationVar(&o.graceful, "graceful-kill-timeout", runnerdouble.DefaultGracefulKillTimeout, "graceful_kill_timeout")
	fs.DurationVar(&o.force, "force-kill-timeout", runnerdouble.DefaultForceKillTimeout, "force_kill_timeout")
	fs.Var(&o.vars, "var", "job variable K=V (repeatable)")
	fs.Var(&o.masked, "masked-var", "masked job variable K=V (repeatable)")
	fs.Var(&o.after, "after", "after_script line (repeatable)")
	fs.Var(&o.steps, "step", "extra stage after build_script, e.g. step_release (repeatable)")
	fs.Var(&o.env, "env", "extra runner environment K=V passed to the driver unprefixed (repeatable)")
	fs.StringVar(&o.project, "project", runnerdouble.DefaultProjectFullPath, "project full path")
	fs.StringVar(&o.registry, "registry", "", "CI_REGISTRY")
	fs.StringVar(&o.gitStrategy, "git-strategy", "none", "GIT_STRATEGY")
	fs.StringVar(&o.buildsDir, "builds-dir", "", "[[runners]] builds_dir fallback")
	fs.StringVar(&o.cacheDir, "cache-dir", "", "[[runners]] cache_dir fallback")
	fs.Int64Var(&o.jobID, "job-id", runnerdouble.DefaultJobID, "CI_JOB_ID")
	fs.IntVar(&o.concurrentID, "concurrent-id", 0, "CI_CONCURRENT_ID")
	fs.BoolVar(&o.keepTemp, "keep-temp", false, "keep the per-job temp dir")
	fs.BoolVar(&o.debug, "debug", false, "print the runner log (cleanup_exec output) after the job")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: runjob --driver PATH [--config PATH] [flags] -- 'script line'...")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if o.driver == "" {
		fs.Usage()
		return nil, errors.New("--driver is required")
	}
	o.script = fs.Args()
	return o, nil
}

func kvMap(pairs []string) (map[string]string, error) {
	if len(pairs) == 0 {
		return nil, nil
	}
	m := map[string]string{}
	for _, p := range pairs {
		k, v, ok := strings.Cut(p, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("%q is not K=V", p)
		}
		m[k] = v
	}
	return m, nil
}

func withConfig(path, stage string) []string {
	if path == "" {
		return []string{stage}
	}
	return []string{"--config", path, stage}
}

func buildConfig(o *options, live io.Writer) (runnerdouble.Config, error) {
	cfg := runnerdouble.Config{
		Driver:              o.driver,
		ConfigArgs:          withConfig(o.config, "config"),
		PrepareArgs:         withConfig(o.config, "prepare"),
		RunArgs:             withConfig(o.config, "run"),
		CleanupArgs:         withConfig(o.config, "cleanup"),
		GracefulKillTimeout: o.graceful,
		ForceKillTimeout:    o.force,
		BuildsDir:           o.buildsDir,
		CacheDir:            o.cacheDir,
		LiveLog:             live,
		KeepTemp:            o.keepTemp,
	}
	base := []string{}
	for _, k := range []string{"PATH", "LANG", "HOME", "USER", "LOGNAME"} {
		if v, ok := os.LookupEnv(k); ok {
			base = append(base, k+"="+v)
		}
	}
	if o.userName != "" {
		u, err := user.Lookup(o.userName)
		if err != nil {
			return cfg, err
		}
		uid, err := strconv.ParseUint(u.Uid, 10, 32)
		if err != nil {
			return cfg, err
		}
		gid, err := strconv.ParseUint(u.Gid, 10, 32)
		if err != nil {
			return cfg, err
		}
		cred := &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
		if gids, err := u.GroupIds(); err == nil {
			for _, g := range gids {
				if n, err := strconv.ParseUint(g, 10, 32); err == nil {
					cred.Groups = append(cred.Groups, uint32(n))
				}
			}
		}
		cfg.Credential = cred
		base = append(base, "HOME="+u.HomeDir, "USER="+u.Username, "LOGNAME="+u.Username)
	}
	cfg.BaseEnv = append(base, o.env...)
	return cfg, nil
}

func run(args []string, stdout, stderr io.Writer) int {
	o, err := parseFlags(args, stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		fmt.Fprintln(stderr, "runjob:", err)
		return 2
	}
	vars, err := kvMap(o.vars)
	if err != nil {
		fmt.Fprintln(stderr, "runjob: --var:", err)
		return 2
	}
	masked, err := kvMap(o.masked)
	if err != nil {
		fmt.Fprintln(stderr, "runjob: --masked-var:", err)
		return 2
	}
	cfg, err := buildConfig(o, stdout)
	if err != nil {
		fmt.Fprintln(stderr, "runjob: --user:", err)
		return 2
	}

	cancel := make(chan struct{})
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sigs)
	go func() {
		select {
		case <-sigs:
			fmt.Fprintln(stderr, "runjob: canceling the job (again to abort)")
			close(cancel)
		case <-ctx.Done():
			return
		}
		select {
		case <-sigs:
			stop()
		case <-ctx.Done():
		}
	}()

	job := runnerdouble.Job{
		ID:              o.jobID,
		ProjectFullPath: o.project,
		Image:           o.image,
		Variables:       vars,
		MaskedVariables: masked,
		Script:          o.script,
		AfterScript:     o.after,
		ExtraSteps:      o.steps,
		Timeout:         o.timeout,
		Registry:        o.registry,
		ConcurrentID:    o.concurrentID,
		GitStrategy:     o.gitStrategy,
		Cancel:          cancel,
	}
	res, err := cfg.Run(ctx, job)
	if err != nil {
		fmt.Fprintln(stderr, "runjob:", err)
		return 2
	}
	if o.debug {
		fmt.Fprintln(stderr, "--- runner log ---")
		fmt.Fprint(stderr, res.RunnerLog)
		for _, c := range res.Stages {
			fmt.Fprintf(stderr, "call %-7s %-22s exit=%d signaled=%t %s\n", c.Kind, c.Stage, c.ExitCode, c.Signaled,
				c.Duration.Round(time.Millisecond))
		}
	}
	if o.keepTemp {
		fmt.Fprintln(stderr, "temp dir kept:", res.TempDir)
	}
	fmt.Fprintf(stdout, "job finished: state=%s failure_reason=%s exit_code=%d\n", res.State, res.FailureReason, res.ExitCode)
	if res.Succeeded() {
		return 0
	}
	return 1
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}
