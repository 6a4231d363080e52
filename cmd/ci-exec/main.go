// Command ci-exec is a GitLab Runner custom-executor driver: the runner calls
// it for the config, prepare, run and cleanup stages of every job, and it
// runs the job's scripts on the host, in a Charliecloud or Apptainer
// container, and optionally through Slurm. See README.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/doctor"
	"github.com/ci-exec/ci-exec/internal/downscope"
	"github.com/ci-exec/ci-exec/internal/localjob"
	"github.com/ci-exec/ci-exec/internal/proc"
	"github.com/ci-exec/ci-exec/internal/stages"
)

const usage = `usage: ci-exec [--config PATH] <command> [args]

Commands (called by gitlab-runner's custom executor):
  config                 print the driver's JSON configuration
  prepare                prepare the job (directories, image)
  run <script> <stage>   run one stage's script
  cleanup                remove the job's files
  reap [--grace D] -- ARGV...
                         run ARGV and end what it leaves running (the batch
                         script's wrapper on a compute node)
  sweep [--stale D] [--runner TOKEN] [--dry-run]
                         cancel this user's Slurm jobs whose CI job is gone
                         (for a cron job or a systemd timer)
  version                print the version

Commands for people (ci-exec help COMMAND for each one's flags and examples):
  exec [flags] [JOB]     run a job of .gitlab-ci.yml here, as the runner would
  check [flags]          check the configuration, runtimes, storage and Slurm
  help [COMMAND]         show this help or a command's

--config PATH   admin configuration (default $CI_EXEC_CONFIG or ` + config.DefaultPath + `)

Examples:
  ci-exec check                      is this machine ready to run jobs?
  ci-exec exec --list                the jobs of ./.gitlab-ci.yml and their images
  ci-exec exec build                 run the job "build" here, as the runner would
  ci-exec help exec                  ci-exec exec's flags
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("ci-exec", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, usage) }
	defPath := os.Getenv("CI_EXEC_CONFIG")
	if defPath == "" {
		defPath = config.DefaultPath
	}
	cfgPath := fs.String("config", defPath, "admin configuration file")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return systemFailureCode()
	}
	rest := fs.Args()
	if len(rest) == 0 {
		fs.Usage()
		return systemFailureCode()
	}

	// The runner stops a stage with SIGTERM to our process group; the stage
	// handlers forward it to their own children's groups.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	inv := stages.Invocation{ConfigPath: *cfgPath, Environ: os.Environ(), Stdout: stdout, Stderr: stderr}
	switch cmd := rest[0]; cmd {
	case "config":
		return stages.Config(ctx, inv)
	case "prepare":
		return subreaper(stdout, func() int { return stages.Prepare(ctx, inv) })
	case "run":
		// The runner appends <script> <stage> to run_args: take the last two
		// so that admin-added run_args can never shift them.
		if len(rest) < 3 {
			fmt.Fprintln(stderr, "ERROR: ci-exec run needs <script> <stage> as its last two arguments")
			return systemFailureCode()
		}
		return subreaper(stdout, func() int { return stages.Run(ctx, inv, rest[len(rest)-2], rest[len(rest)-1]) })
	case "cleanup":
		return subreaper(stdout, func() int { return stages.Cleanup(ctx, inv) })
	case "reap":
		return reap(ctx, rest[1:], stderr)
	case downscope.AsUserCommand:
		return asUser(ctx, stdout, stderr)
	case "exec":
		return subreaper(stderr, func() int { return localjob.Main(ctx, rest[1:], self(), *cfgPath, stdout, stderr) })
	case "check":
		return doctor.Main(ctx, rest[1:], *cfgPath, stdout, stderr)
	case "help", "--help", "-h":
		return help(rest[1:], stdout, stderr)
	case "sweep":
		return sweep(ctx, inv, rest[1:], stderr)
	case "version", "--version":
		fmt.Fprintf(stdout, "%s %s\n", stages.DriverName, stages.DriverVersion())
		return 0
	default:
		fmt.Fprintf(stderr, "ERROR: ci-exec: unknown command %q\n", cmd)
		fs.Usage()
		return systemFailureCode()
	}
}

// help prints the usage of ci-exec or of one command.
func help(args []string, stdout, stderr io.Writer) int {
	topic := ""
	if len(args) > 0 {
		topic = args[0]
	}
	switch topic {
	case "":
		fmt.Fprint(stdout, usage)
	case "exec":
		fmt.Fprint(stdout, localjob.Usage)
	case "check":
		fmt.Fprint(stdout, doctor.Usage)
	case "config", "prepare", "run", "cleanup", "reap":
		fmt.Fprintf(stdout, "ci-exec %s is called by gitlab-runner's custom executor (see docs/admin-guide.md and configs/runner-config.toml).\n\n%s", topic, usage)
	default:
		fmt.Fprintf(stderr, "ERROR: ci-exec help: unknown command %q\n", topic)
		fmt.Fprint(stderr, usage)
		return systemFailureCode()
	}
	return 0
}

// self is this binary, which ci-exec exec calls for each stage as the
// runner would.
func self() string {
	if p, err := os.Executable(); err == nil {
		return p
	}
	return os.Args[0]
}

// subreaper runs a stage that starts processes as a child subreaper, so
// that what they leave running (setsid, double forks) reparents to ci-exec
// instead of init and is ended before the stage returns (each proc.Run does
// that for its command), and sweeps up what is left at the end.
func subreaper(log io.Writer, stage func() int) int {
	if err := proc.BecomeSubreaper(); err != nil {
		fmt.Fprintf(log, "WARNING: ci-exec could not become a child subreaper (%v): processes a script starts with setsid may outlive the stage\n", err)
	}
	code := stage()
	if left := proc.KillOrphans(); len(left) > 0 {
		fmt.Fprintln(log, proc.Summary(left))
	}
	return code
}

// systemFailureCode is the runner's system-failure code, for errors found
// before a stage handler runs.
func systemFailureCode() int {
	var n int
	if _, err := fmt.Sscanf(os.Getenv("SYSTEM_FAILURE_EXIT_CODE"), "%d", &n); err == nil && n > 0 && n < 256 {
		return n
	}
	return 2
}
