package stages_test

// The job against its driver: from inside its own container, a job tries
// to find and rewrite whatever steers its later stages or other jobs (the
// prepare state, the image store, the probe cache, the runner account's
// home and temp dirs), plants a program for ci-exec to run, and then looks
// where its next stage runs. Every row of docs/security.md's table for the
// container runtimes has a check here.

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/runnerdouble"
	"github.com/ci-exec/ci-exec/internal/testenv"
)

// hostileScript is a build_script that attacks everything it can reach
// under data (the user's data dir), from inside the container.
func hostileScript(data string) []string {
	return []string{
		`D=` + shellQuote(data),
		`S="$D/state/$CI_RUNNER_SHORT_TOKEN/$(printf %03d "$CI_CONCURRENT_ID")/$CI_JOB_ID"`,
		`ls -a "$D" | sed 's/^/data-entry: /'`,
		// What would let it steer: the state, the store, the probe cache.
		`(find / \( -path /proc -o -path /sys -o -path /dev \) -prune -o \( -name state.json -o -name mechanism.json -o -name probe.json -o -name '*.sif' -o -name '*.sqfs' -o -name entries -o -name refs \) -print 2>/dev/null || true) | sed 's/^/found: /'`,
		// Other processes' view of the host (no pid namespace here), before
		// the job makes any such path itself.
		`for p in /proc/[0-9]*/root; do [ -e "$p$S/state.json" ] && echo "HOST ROOT REACHED via $p"; done; true`,
		// A program for ci-exec to run on the host, and state that names it.
		`printf '#!/bin/sh\necho pwned > %s/pwned\n' "$CI_PROJECT_DIR" > "$CI_PROJECT_DIR/evil" && chmod +x "$CI_PROJECT_DIR/evil"`,
		`steer='{"mechanism":"charliecloud","info":{"programs":{"ch-run":"'"$CI_PROJECT_DIR/evil"'","apptainer":"'"$CI_PROJECT_DIR/evil"'"}},"user_args":["--bind=/etc:/mnt"]}'`,
		`find "$D" -type f ! -path "$D/builds/*" 2>/dev/null | while read -r f; do [ "$f" = "$0" ] && continue; echo "$steer" > "$f" 2>/dev/null && echo "rewrote: $f" || echo "refused: $f"; done`,
		`for n in state.json mechanism.json; do mkdir -p "$S" 2>/dev/null && echo "$steer" > "$S/$n" 2>/dev/null && echo "planted $S/$n" || echo "cannot plant $S/$n"; done`,
		// The runner account's home and temp dirs.
		`for d in "$HOME" /tmp /var/tmp; do echo leak > "$d/ci-exec-leak-$CI_JOB_ID" 2>/dev/null && echo "wrote $d" || echo "cannot write $d"; done`,
		`echo hostile-done`,
	}
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

func TestContainerJobCannotSteerItsDriver(t *testing.T) {
	forEachRuntimeAndUser(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		for _, c := range []struct {
			name, general, table, storage string
		}{
			// The job names no image and the admin forces one: a stage
			// steered to the host would be visible at once.
			{"forced", "force_mechanism = true", "default_image = %q", "storage"},
			// Converted images, with the store in the data dir (where batch
			// executors keep it by default). The name is short: ch-run 0.31
			// cannot run an image path of more than about 250 bytes.
			{"store-in-data", "force_mechanism = true", "default_image = %q\nconvert = true", "data/" + u.Name},
		} {
			t.Run(c.name, func(t *testing.T) {
				image := testenv.Fact(t, "CI_EXEC_TEST_IMAGE")
				e := containerRunnerIn(t, rt, u, c.general, fmt.Sprintf(c.table, image), c.storage)
				j := tokenJob(t, "")
				j.ID = 4242
				j.Script = hostileScript(e.data)
				j.AfterScript = []string{`grep '^ID=' /etc/os-release | sed 's/^/after: /'`, `test -e /mnt/passwd && echo "PLANTED BIND"; true`}
				j.ExtraSteps = []string{"step_next"}
				for _, d := range []string{u.Home, "/tmp", "/var/tmp"} {
					_ = os.Remove(filepath.Join(d, "ci-exec-leak-4242"))
				}
				res := runJob(t, e.runner, j)

				require.True(t, res.Succeeded(), res.Error)
				out := outputLines(res.Log)
				require.Contains(t, out, "hostile-done")
				for _, line := range strings.Split(out, "\n") {
					if entry, ok := strings.CutPrefix(line, "data-entry: "); ok {
						assert.Contains(t, []string{".", "..", "builds", "cache", "scripts"}, entry, "the container sees only the job's own dirs of the data dir")
					}
				}
				assert.NotContains(t, out, "found: ", "no state, store or probe cache is visible in the container")
				assert.NotContains(t, out, "HOST ROOT REACHED")
				assert.Contains(t, res.Log, "after: ID=citiny\n", "after_script still runs in the image")
				assert.Contains(t, res.Log, "step_next", "later stages still run")
				assert.NotContains(t, res.Log, "Running after_script on the host")
				assert.NoFileExists(t, filepath.Join(res.ProjectDir, "pwned"), "ci-exec never runs a program the job planted")
				assert.NotContains(t, out, "PLANTED BIND", "no planted --bind reached the command line")
				for _, d := range []string{u.Home, "/tmp", "/var/tmp"} {
					assert.NoFileExists(t, filepath.Join(d, "ci-exec-leak-4242"), "the container must not write the host's %s", d)
				}
			})
		}
	})
}

// outputLines is the job log without the "$ command" echoes of the
// runner's scripts: what the job's commands printed.
func outputLines(log string) string {
	var out []string
	for _, l := range strings.Split(log, "\n") {
		if !strings.HasPrefix(l, "$ ") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// ch-run 0.31 takes a long SquashFS path for an image name; prepare says
// so, naming the key to change, instead of every stage failing later.
func TestCharliecloudLongImagePathIsRefused(t *testing.T) {
	u := testenv.Unprivileged(t)
	testenv.RequireBinary(t, charliecloudFixture.program)
	e := containerRunnerIn(t, charliecloudFixture, u, "", "convert = true", "storage/"+strings.Repeat("s", 200))
	res := runJob(t, e.runner, tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE")))
	assert.Equal(t, runnerdouble.ReasonRunnerSystemFailure, res.FailureReason)
	assert.Contains(t, res.Log, "set general.charliecloud.image_storage_dir to a shorter directory")
	assert.Empty(t, res.RunStages(), "no stage runs")
}
