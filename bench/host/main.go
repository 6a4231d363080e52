// Command host measures what ci-exec adds to a trivial run stage on the host:
// `ci-exec run <script> build_script` against `bash <script>` for the same
// runner-style script, both timed in the same run. Results go in
// docs/performance.md.
//
//	go run ./bench/host [-runs 50]
package main

import (
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/ci-exec/ci-exec/bench/measure"
)

// script is shaped like the runner's bash scripts (see
// internal/runnerdouble), with a trivial body.
const script = `#!/usr/bin/env bash
trap 'exit 1' TERM
set -o errexit
case "$(set -o)" in *pipefail*) set -o pipefail;; esac
export CI_JOB_ID='1'
( echo hello ) < /dev/null
exit 0
`

func main() {
	runs := flag.Int("runs", 50, "timed runs per command")
	flag.Parse()
	work, err := os.MkdirTemp("", "ci-exec-bench-host-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(work)
	driver := filepath.Join(work, "ci-exec")
	build := exec.Command("go", "build", "-o", driver, "./cmd/ci-exec")
	build.Stderr = os.Stderr
	if err := build.Run(); err != nil {
		log.Fatalf("build ci-exec (run from the repository root): %v", err)
	}
	cfg := filepath.Join(work, "config.toml")
	must(os.WriteFile(cfg, []byte(fmt.Sprintf("[general]\ndata_dir = %q\n", filepath.Join(work, "data"))), 0o600))
	scriptPath := filepath.Join(work, "script")
	must(os.WriteFile(scriptPath, []byte(script), 0o700))
	response := filepath.Join(work, "response.json")
	must(os.WriteFile(response, []byte(`{"id":1,"token":"benchtoken123"}`), 0o600))
	env := []string{
		"PATH=/usr/local/bin:/usr/bin:/bin", "HOME=" + work, "USER=" + os.Getenv("USER"), "TMPDIR=" + work,
		"BUILD_FAILURE_EXIT_CODE=1", "SYSTEM_FAILURE_EXIT_CODE=2",
		"BUILD_EXIT_CODE_FILE=" + filepath.Join(work, "build_exit_code"), "JOB_RESPONSE_FILE=" + response,
		"CUSTOM_ENV_CI_JOB_ID=1", "CUSTOM_ENV_CI_RUNNER_SHORT_TOKEN=bench", "CUSTOM_ENV_CI_CONCURRENT_ID=0",
	}
	// Create the layout once, as the config stage would.
	must(measure.Command([]string{driver, "--config", cfg, "config"}, env, work)())

	bare, err := measure.Func("bash script (bare)", 5, *runs, measure.Command([]string{"/bin/bash", scriptPath}, env, work))
	must(err)
	via, err := measure.Func("ci-exec run script build_script", 5, *runs, measure.Command([]string{driver, "--config", cfg, "run", scriptPath, "build_script"}, env, work))
	must(err)
	measure.Table(os.Stdout, bare, via)
	fmt.Printf("\noverhead per stage: %.1f ms (median), ratio %.2f\n",
		float64(via.Median()-bare.Median())/1e6, measure.Ratio(via, bare))
}

func must(err error) {
	if err != nil {
		log.Fatal(err)
	}
}
