package stages_test

// What a job prints must not grow ci-exec: 50 MiB without a newline on
// stdout, the same on stderr, then 100 MiB of lines, on the host, in both
// runtimes and under Slurm (on the node's host and in Charliecloud), while
// the runner double reads ci-exec's own peak RSS (VmHWM: its memory only,
// not that of the processes it runs).

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/runnerdouble"
	"github.com/ci-exec/ci-exec/internal/testenv"
)

const (
	longLine    = 50 << 20
	linesTotal  = 100 << 20
	rssGoal     = 20 << 20
	printedLine = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghijklmnopqrstuvwxyzA" // 99 bytes
)

// bigOutput prints a 50 MiB line of Q on stdout, 100 MiB of 100-byte
// lines, then a 50 MiB line of R on stderr. stderr comes last: in a local
// container stage ci-exec copies stderr (to find the runtime's error
// line) while stdout reaches the runner directly, so what the runner's
// script writes to stdout meanwhile (its echo of the next command) may
// land inside the stderr line, and earlier stderr inside stdout lines.
func bigOutput() []string {
	return []string{
		fmt.Sprintf(`head -c %d /dev/zero | tr '\0' Q`, longLine),
		`echo`,
		// Not yes | head: yes would end on SIGPIPE, and the runner's
		// scripts set pipefail.
		fmt.Sprintf(`seq %d | sed 's/.*/%s/'`, linesTotal/(len(printedLine)+1), printedLine),
		`echo done-printing`,
		// stderr last: in a container stage ci-exec copies stderr (to find
		// a runtime's own error line) while stdout goes to the runner
		// directly, so stdout printed after it could land inside it.
		fmt.Sprintf(`head -c %d /dev/zero | tr '\0' R >&2`, longLine),
		`echo >&2`,
	}
}

func TestBigOutputKeepsMemoryFlat(t *testing.T) {
	u := testenv.Unprivileged(t)
	cases := map[string]func(t *testing.T) (runnerdouble.Config, runnerdouble.Job){
		"host": func(t *testing.T) (runnerdouble.Config, runnerdouble.Job) {
			c, _ := hostRunner(t, u, "")
			return c, runnerdouble.Job{}
		},
		"charliecloud": func(t *testing.T) (runnerdouble.Config, runnerdouble.Job) {
			testenv.RequireBinary(t, charliecloudFixture.program)
			e := containerRunner(t, charliecloudFixture, u, "", "")
			return e.runner, tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
		},
		"apptainer": func(t *testing.T) (runnerdouble.Config, runnerdouble.Job) {
			testenv.RequireBinary(t, apptainerFixture.program)
			e := containerRunner(t, apptainerFixture, u, "", "")
			return e.runner, tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
		},
		"slurm": func(t *testing.T) (runnerdouble.Config, runnerdouble.Job) {
			c, _ := slurmRunner(t, u, "", "")
			return c, batchJob()
		},
		"slurm/charliecloud": func(t *testing.T) (runnerdouble.Config, runnerdouble.Job) {
			testenv.RequireBinary(t, charliecloudFixture.program)
			requireSlurmUp(t)
			e := containerRunner(t, charliecloudFixture, u, `executor = "slurm"`, "")
			j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
			j.ID = batchJobID.Add(1)
			return e.runner, j
		},
	}
	for name, setup := range cases {
		t.Run(name, func(t *testing.T) {
			c, j := setup(t)
			j.Script = bigOutput()
			res := runBigJob(t, c, j)
			require.True(t, res.Succeeded(), res.Error)

			build := res.Call("build_script")
			require.NotNil(t, build)
			t.Logf("build_script: ci-exec's peak RSS %.1f MiB", float64(build.PeakRSS)/(1<<20))
			assert.Greater(t, build.PeakRSS, int64(0))
			assert.LessOrEqual(t, build.PeakRSS, int64(rssGoal), "ci-exec's memory grew with the job's output")

			// Every byte arrived, in one piece per line.
			assertAllOf(t, res.Log, 'Q', true)
			assertAllOf(t, res.Log, 'R', name != "charliecloud" && name != "apptainer")
			assert.Equal(t, linesTotal/(len(printedLine)+1), strings.Count(res.Log, printedLine+"\n"), "all 100 MiB of lines arrived")
			assert.Contains(t, res.Log, "\ndone-printing\n")
			if j.ID != 0 {
				assertNoSlurmJob(t, j)
			}
		})
	}
}

// assertAllOf checks that the log holds longLine bytes of c in long
// runs, in one run when whole (one pass over the log: strings.Index with
// a 50 MiB needle is far too slow).
func assertAllOf(t *testing.T, log string, c byte, whole bool) {
	t.Helper()
	var runs []int
	total := 0
	for i := 0; i < len(log); {
		if log[i] != c {
			i++
			continue
		}
		j := i
		for j < len(log) && log[j] == c {
			j++
		}
		if j-i >= 1024 {
			runs = append(runs, j-i)
			total += j - i
		}
		i = j
	}
	assert.Equal(t, longLine, total, "all 50 MiB of %c arrived, once (runs %v)", c, runs)
	if whole {
		assert.Equal(t, []int{longLine}, runs, "the 50 MiB line of %c arrived in one piece", c)
	}
}

// runBigJob is runJob for a job whose log is too big to print: it logs
// the log with long lines cut and repeated lines counted.
func runBigJob(t *testing.T, c runnerdouble.Config, j runnerdouble.Job) *runnerdouble.Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	res, err := c.Run(ctx, j)
	require.NoError(t, err)
	var b strings.Builder
	lines := strings.Split(res.Log, "\n")
	for i := 0; i < len(lines); i++ {
		n := 1
		for i+n < len(lines) && lines[i+n] == lines[i] {
			n++
		}
		l := lines[i]
		if len(l) > 200 {
			l = fmt.Sprintf("%s[... %d more bytes]", l[:200], len(l)-200)
		}
		b.WriteString(l + "\n")
		if n > 1 {
			fmt.Fprintf(&b, "[... the same line %d more times]\n", n-1)
			i += n - 1
		}
	}
	t.Logf("job log (%d bytes):\n%s\nrunner log:\n%s", len(res.Log), b.String(), res.RunnerLog)
	return res
}
