// Package doctor is `ci-exec check`: it tells an admin, before a user's job
// finds out, whether a runner's configuration and machine can run jobs.
// It validates the config (every problem at once, each with its key and
// line), probes the configured runtime with the runtimes' own probe code
// and the features that decide how ci-exec runs it, checks data_dir and
// image_storage_dir, tries the registries the image allowlist implies,
// asks Slurm whether it would take a job, and fetches the JWKS when ID
// tokens are configured. One line per check: ✓, ✗ (with the fix) or a
// warning. Nothing is changed on the system except what a job would
// create itself (the runtime's probe cache in the user's image store).
package doctor

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
)

// Status is a check's outcome.
type Status string

// The outcomes: only Fail makes `ci-exec check` exit non-zero.
const (
	OK   Status = "ok"
	Warn Status = "warning"
	Fail Status = "fail"
)

func (s Status) mark() string {
	switch s {
	case OK:
		return "✓"
	case Warn:
		return "!"
	}
	return "✗"
}

// Check is one line of the report.
type Check struct {
	// Area groups checks: config, data_dir, charliecloud, slurm, ...
	Area   string `json:"area"`
	Status Status `json:"status"`
	// Message says what was found; Fix what to do (Fail and Warn only).
	Message string `json:"message"`
	Fix     string `json:"fix,omitempty"`
	// Key is the config key the check is about, Line its line.
	Key  string `json:"key,omitempty"`
	Line int    `json:"line,omitempty"`
}

// Report is every check, in order.
type Report struct {
	ConfigPath string  `json:"config"`
	User       string  `json:"user"`
	Checks     []Check `json:"checks"`
}

func (r *Report) add(c Check) { r.Checks = append(r.Checks, c) }

func (r *Report) ok(area, format string, args ...any) {
	r.add(Check{Area: area, Status: OK, Message: fmt.Sprintf(format, args...)})
}

// failedSince reports whether a check from index i on failed.
func (r *Report) failedSince(i int) bool {
	for _, c := range r.Checks[i:] {
		if c.Status == Fail {
			return true
		}
	}
	return false
}

// Failed reports whether any check failed.
func (r *Report) Failed() bool {
	for _, c := range r.Checks {
		if c.Status == Fail {
			return true
		}
	}
	return false
}

// Print writes the report as one line per check.
func (r *Report) Print(w io.Writer) {
	fmt.Fprintf(w, "ci-exec check of %s for user %s\n", r.ConfigPath, r.User)
	fails, warns := 0, 0
	for _, c := range r.Checks {
		line := fmt.Sprintf("%s %-12s %s", c.Status.mark(), c.Area, c.Message)
		if c.Key != "" && !strings.Contains(c.Message, c.Key) {
			line += " [" + c.Key + "]"
		}
		if c.Line > 0 {
			line += fmt.Sprintf(" (line %d)", c.Line)
		}
		if c.Fix != "" {
			line += " — " + c.Fix
		}
		fmt.Fprintln(w, line)
		switch c.Status {
		case Fail:
			fails++
		case Warn:
			warns++
		}
	}
	switch {
	case fails > 0:
		fmt.Fprintf(w, "%d check(s) failed, %d warning(s): jobs will fail until the ✗ lines are fixed\n", fails, warns)
	case warns > 0:
		fmt.Fprintf(w, "all checks passed, %d warning(s)\n", warns)
	default:
		fmt.Fprintln(w, "all checks passed")
	}
}

// PrintJSON writes the report as JSON.
func (r *Report) PrintJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// Usage is `ci-exec help check`.
const Usage = `usage: ci-exec [--config PATH] check [--json] [--as USER]

Checks that this machine and configuration can run CI jobs, before a user's
job finds out: the configuration (every problem at once, with its key and
line), the configured runtime (version; user namespaces, --write-fake,
SquashFUSE, FUSE, conversion tools, cgroup delegation), data_dir and
image_storage_dir (exist or creatable, owner, mode, file system, free
space), the registries the image allowlist names, Slurm (scontrol ping, the
partition, sbatch --test-only) and, with ID tokens configured, the JWKS.

One line per check: ✓ passed, ! warning, ✗ failed (with the fix).
Exit status 0 when nothing failed, 1 when a check failed, 2 on usage errors.

Flags:
  --json      print the report as JSON
  --as USER   check as USER would meet it ($USER and $HOME in the config are
              USER's, directories are checked for USER, probes run as USER);
              needs root unless USER is you

Examples:
  ci-exec check
  ci-exec --config /etc/ci-exec/config.toml check --as alice
  ci-exec check --json | jq '.checks[] | select(.status != "ok")'
`

// Main is `ci-exec check`.
func Main(ctx context.Context, args []string, configPath string, stdout, stderr io.Writer) int {
	asJSON := false
	as := ""
	for i := 0; i < len(args); i++ {
		switch a := args[i]; {
		case a == "--json" || a == "-json":
			asJSON = true
		case a == "--as" || a == "-as":
			if i+1 >= len(args) {
				fmt.Fprintln(stderr, "ERROR: ci-exec check: --as needs a user name")
				return 2
			}
			i++
			as = args[i]
		case strings.HasPrefix(a, "--as="):
			as = strings.TrimPrefix(a, "--as=")
		case a == "--help" || a == "-h" || a == "-help":
			fmt.Fprint(stdout, Usage)
			return 0
		default:
			fmt.Fprintf(stderr, "ERROR: ci-exec check: unknown argument %q\n%s", a, Usage)
			return 2
		}
	}
	if as != "" {
		if code, done := runAs(ctx, as, configPath, asJSON, stdout, stderr); done {
			return code
		}
	}
	r := Run(ctx, configPath)
	if asJSON {
		if err := r.PrintJSON(stdout); err != nil {
			return 2
		}
	} else {
		r.Print(stdout)
	}
	if r.Failed() {
		return 1
	}
	return 0
}

// hostEnv is the process environment as a map (what the runtimes consult
// for proxies and CAs).
func hostEnv() map[string]string {
	m := map[string]string{}
	for _, kv := range os.Environ() {
		if k, v, ok := strings.Cut(kv, "="); ok {
			m[k] = v
		}
	}
	return m
}
