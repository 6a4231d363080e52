package measure

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// Driver is a built ci-exec with a config and the environment the runner
// would give one job, for benchmarks that call its stages directly.
type Driver struct {
	Path, Config, Work string
	Env                []string
}

// NewDriver builds ./cmd/ci-exec into work (run from the repository root),
// writes config there, and prepares a job environment: the contract
// variables, a job response file and the given CUSTOM_ENV_ extras.
func NewDriver(work, config string, customEnv ...string) (*Driver, error) {
	d := &Driver{Path: filepath.Join(work, "ci-exec"), Config: filepath.Join(work, "config.toml"), Work: work}
	build := exec.Command("go", "build", "-o", d.Path, "./cmd/ci-exec")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build ci-exec (run from the repository root): %v\n%s", err, out)
	}
	if err := os.WriteFile(d.Config, []byte(config), 0o600); err != nil {
		return nil, err
	}
	response := filepath.Join(work, "response.json")
	if err := os.WriteFile(response, []byte(`{"id":1,"token":"benchtoken123"}`), 0o600); err != nil {
		return nil, err
	}
	d.Env = append([]string{
		"PATH=/usr/local/bin:/usr/bin:/bin", "HOME=" + work, "USER=" + os.Getenv("USER"), "TMPDIR=" + work,
		"BUILD_FAILURE_EXIT_CODE=1", "SYSTEM_FAILURE_EXIT_CODE=2",
		"BUILD_EXIT_CODE_FILE=" + filepath.Join(work, "build_exit_code"), "JOB_RESPONSE_FILE=" + response,
		"CUSTOM_ENV_CI_JOB_ID=1", "CUSTOM_ENV_CI_RUNNER_SHORT_TOKEN=bench", "CUSTOM_ENV_CI_CONCURRENT_ID=0",
	}, customEnv...)
	return d, nil
}

// Stage returns the argv of one ci-exec call ("config", "prepare",
// "run SCRIPT STAGE", "cleanup").
func (d *Driver) Stage(args ...string) []string {
	return append([]string{d.Path, "--config", d.Config}, args...)
}

// RunnerScript is shaped like the runner's bash scripts (see
// internal/runnerdouble), with a trivial body; it also runs under a POSIX sh.
const RunnerScript = `#!/usr/bin/env bash
trap 'exit 1' TERM
set -o errexit
case "$(set -o)" in *pipefail*) set -o pipefail;; esac
export CI_JOB_ID='1'
( echo hello ) < /dev/null
exit 0
`
