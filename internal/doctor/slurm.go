package doctor

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/idtoken"
)

// slurmProgram is a Slurm command from batch.scheduler_bin or the system
// dirs, as the batch executor finds it (internal/batch).
func slurmProgram(cfg *config.Config, name string) string {
	if d := cfg.Batch.SchedulerBin; d != "" {
		return filepath.Join(d, name)
	}
	for _, d := range []string{"/usr/local/bin", "/usr/bin", "/bin"} {
		if inDir(d, name) {
			return filepath.Join(d, name)
		}
	}
	return name
}

func runTool(ctx context.Context, argv ...string) (string, error) {
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var out bytes.Buffer
	cmd := exec.CommandContext(cctx, argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = time.Second
	err := cmd.Run()
	return strings.TrimSpace(out.String()), err
}

// partition is the partition batch.options ask for ("" for Slurm's default).
func partition(opts []string) string {
	for i, o := range opts {
		switch {
		case strings.HasPrefix(o, "--partition="):
			return strings.TrimPrefix(o, "--partition=")
		case (o == "--partition" || o == "-p") && i+1 < len(opts):
			return opts[i+1]
		case strings.HasPrefix(o, "-p") && len(o) > 2:
			return o[2:]
		}
	}
	return ""
}

// checkSlurm asks the controller whether it is up, whether the partition
// takes jobs, and whether sbatch would accept a job with the admin's
// options.
func checkSlurm(ctx context.Context, r *Report, cfg *config.Config) {
	const area = "slurm"
	fixBin := "install Slurm's client commands or set batch.scheduler_bin"
	out, err := runTool(ctx, slurmProgram(cfg, "scontrol"), "ping")
	switch {
	case err != nil && strings.Contains(out, "DOWN"):
		r.add(Check{Area: area, Status: Fail, Key: "general.executor", Message: "scontrol ping: " + oneLine(out),
			Fix: "start slurmctld (systemctl start slurmctld) or check SlurmctldHost in slurm.conf and munge"})
		return
	case err != nil:
		msg := oneLine(out)
		if msg == "" {
			msg = err.Error()
		}
		fix := "start slurmctld, or check slurm.conf and munged on this host"
		if _, ok := err.(*exec.ExitError); !ok {
			fix = fixBin
		}
		r.add(Check{Area: area, Status: Fail, Key: "general.executor", Message: "scontrol ping: " + msg, Fix: fix})
		return
	case strings.Contains(out, "DOWN"):
		r.add(Check{Area: area, Status: Fail, Key: "general.executor", Message: "scontrol ping: " + oneLine(out),
			Fix: "start slurmctld or check SlurmctldHost in slurm.conf"})
		return
	}
	r.ok(area, "scontrol ping: %s", oneLine(out))

	if p := partition(cfg.Batch.Options); p != "" {
		out, err := runTool(ctx, slurmProgram(cfg, "scontrol"), "show", "partition", p, "--oneliner")
		switch {
		case err != nil:
			r.add(Check{Area: area, Status: Fail, Key: "batch.options", Message: fmt.Sprintf("partition %s: %s", p, oneLine(out)),
				Fix: "name an existing partition in batch.options (sinfo lists them)"})
		case !strings.Contains(out, "State=UP"):
			state := "not UP"
			for _, f := range strings.Fields(out) {
				if strings.HasPrefix(f, "State=") {
					state = f
				}
			}
			r.add(Check{Area: area, Status: Fail, Key: "batch.options", Message: fmt.Sprintf("partition %s: %s", p, state),
				Fix: "scontrol update PartitionName=" + p + " State=UP"})
		default:
			r.ok(area, "partition %s is UP", p)
		}
	}

	args := append([]string{slurmProgram(cfg, "sbatch"), "--test-only"}, cfg.Batch.Options...)
	args = append(args, "--wrap=true")
	out, err = runTool(ctx, args...)
	if err != nil {
		r.add(Check{Area: area, Status: Fail, Key: "batch.options", Message: "sbatch --test-only: " + oneLine(out),
			Fix: "correct batch.options, or the user's account and partition access (sacctmgr)"})
		return
	}
	r.ok(area, "sbatch --test-only: %s", strings.TrimPrefix(oneLine(out), "sbatch: "))
}

// checkJWKS fetches the keys ID tokens are verified with, when the config
// uses them (auth.jwks_file, or general.gitlab_server with downscoping).
func checkJWKS(ctx context.Context, r *Report, cfg *config.Config) {
	const area = "auth"
	var src idtoken.KeySource
	key := ""
	switch {
	case cfg.Auth.JWKSFile != "":
		src, key = idtoken.FileKeys{Path: cfg.Auth.JWKSFile}, "auth.jwks_file"
	case cfg.General.GitlabServer != "" && (cfg.Auth.Downscoping() || cfg.Auth.JWTAudience != ""):
		src, key = &idtoken.HTTPKeys{URL: idtoken.ServerKeysURL(cfg.General.GitlabServer)}, "general.gitlab_server"
	default:
		return
	}
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	set, err := src.Keys(cctx, true)
	if err != nil {
		r.add(Check{Area: area, Status: Fail, Key: key, Message: fmt.Sprintf("JWKS from %v: %s", src, oneLine(err.Error())),
			Fix: "ID tokens cannot be verified: fix " + key + " (GitLab serves its keys at /oauth/discovery/keys)"})
		return
	}
	if set == nil || len(set.Keys) == 0 {
		r.add(Check{Area: area, Status: Fail, Key: key, Message: fmt.Sprintf("JWKS from %v has no keys", src), Fix: "point " + key + " at GitLab's keys"})
		return
	}
	r.ok(area, "JWKS from %v: %d key(s)", src, len(set.Keys))
}
