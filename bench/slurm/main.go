// Command slurm measures what ci-exec's Slurm executor adds to a trivial
// build stage, all timed in the same run on the same cluster:
//
//   - `ci-exec run <script> build_script` with executor = "slurm" (write the
//     batch script, sbatch --parsable, poll scontrol, stream the output);
//   - `srun bash <script>`: the lowest-latency way to run it on a node;
//   - `sbatch --wait -o FILE <script>`: the simple way, which notices the
//     end only at its own 2 s, 10 s, ... polls;
//   - `sbatch --parsable` plus `scontrol show job` every 20 ms until the job
//     ends: the floor for any batch submission, Slurm's own scheduling and
//     launch latency (its controller schedules new batch jobs about once a
//     second), with nothing of ci-exec's work.
//
// It needs the Slurm cluster of scripts/test-env.sh. Results go in
// docs/performance.md.
//
//	go run ./bench/slurm [-runs 10]
package main

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/ci-exec/ci-exec/bench/measure"
)

func main() {
	runs := flag.Int("runs", 10, "timed runs per command")
	flag.Parse()
	work, err := os.MkdirTemp("/var/tmp", "ci-exec-bench-slurm-")
	measure.Must(err)
	defer os.RemoveAll(work)
	d, err := measure.NewDriver(work, fmt.Sprintf("[general]\ndata_dir = %q\nexecutor = \"slurm\"\n", filepath.Join(work, "data")))
	measure.Must(err)
	script := filepath.Join(work, "script")
	measure.Must(os.WriteFile(script, []byte(measure.RunnerScript), 0o755))
	measure.Must(measure.Command(d.Stage("config"), d.Env, work)())
	measure.Must(measure.Command(d.Stage("prepare"), d.Env, work)())

	srun, err := measure.Func("srun bash script", 2, *runs, measure.Command([]string{"/usr/bin/srun", "/bin/bash", script}, d.Env, work))
	measure.Must(err)
	wait, err := measure.Func("sbatch --wait", 1, *runs,
		measure.Command([]string{"/usr/bin/sbatch", "--wait", "-o", filepath.Join(work, "wait.out"), script}, d.Env, work))
	measure.Must(err)
	floor, err := measure.Func("sbatch --parsable + poll 20ms", 1, *runs, func() error { return submitAndPoll(script, d.Env, work) })
	measure.Must(err)
	via, err := measure.Func("ci-exec run (executor slurm)", 2, *runs, measure.Command(d.Stage("run", script, "build_script"), d.Env, work))
	measure.Must(err)
	measure.Table(os.Stdout, srun, wait, floor, via)
	fmt.Printf("\nci-exec over srun: %+.2f s (median), ratio %.2f\n", (via.Median() - srun.Median()).Seconds(), measure.Ratio(via, srun))
	fmt.Printf("ci-exec over sbatch --wait: %+.2f s (median), ratio %.2f\n", (via.Median() - wait.Median()).Seconds(), measure.Ratio(via, wait))
	fmt.Printf("ci-exec over sbatch + 20 ms polling: %+.2f s (median), ratio %.2f\n", (via.Median() - floor.Median()).Seconds(), measure.Ratio(via, floor))
}

// submitAndPoll submits script and polls scontrol every 20 ms until the
// job has ended.
func submitAndPoll(script string, env []string, dir string) error {
	cmd := exec.Command("/usr/bin/sbatch", "--parsable", "-o", filepath.Join(dir, "poll.out"), script)
	cmd.Env, cmd.Dir = env, dir
	out, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("sbatch: %v", err)
	}
	id := strings.TrimSpace(string(out))
	for {
		st, err := exec.Command("/usr/bin/scontrol", "show", "job", "-o", id).Output()
		if err != nil {
			return fmt.Errorf("scontrol: %v", err)
		}
		if strings.Contains(string(st), "JobState=COMPLETED") {
			return nil
		}
		if strings.Contains(string(st), "JobState=FAILED") || strings.Contains(string(st), "JobState=CANCELLED") {
			return fmt.Errorf("job %s failed: %s", id, st)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
