// Command ci-exec is a GitLab Runner custom-executor driver: the runner calls
// it for the config, prepare, run and cleanup stages of every job, and it
// runs the job's scripts on the host, in a Charliecloud or Apptainer
// container, and optionally through Slurm. See README.md.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/proc"
	"github.com/ci-exec/ci-exec/internal/stages"
)

const usage = `usage: ci-exec [--config PATH] <command> [args]

Commands (called by gitlab-runner's custom executor):
  config                 print the driver's JSON configuration
  prepare                prepare the job (directories, image)
  run <script> <stage>   run one stage's script
  cleanup                remove the job's files
  version                print the version

--config PATH   admin configuration (default $CI_EXEC_CONFIG or ` + config.DefaultPath + `)
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
		_ = proc.BecomeSubreaper()
		return stages.Prepare(ctx, inv)
	case "run":
		// The runner appends <script> <stage> to run_args: take the last two
		// so that admin-added run_args can never shift them.
		if len(rest) < 3 {
			fmt.Fprintln(stderr, "ERROR: ci-exec run needs <script> <stage> as its last two arguments")
			return systemFailureCode()
		}
		_ = proc.BecomeSubreaper()
		return stages.Run(ctx, inv, rest[len(rest)-2], rest[len(rest)-1])
	case "cleanup":
		return stages.Cleanup(ctx, inv)
	case "version", "--version":
		fmt.Fprintf(stdout, "%s %s\n", stages.DriverName, stages.DriverVersion())
		return 0
	default:
		fmt.Fprintf(stderr, "ERROR: ci-exec: unknown command %q\n", cmd)
		fs.Usage()
		return systemFailureCode()
	}
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
