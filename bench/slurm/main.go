// Command slurm measures what ci-exec's Slurm executor adds, all timed in
// the same run on the same cluster.
//
// Per stage, once the job's allocation runs (batch.allocate = "prepare"):
//
//   - `bash <script>` on the login node: the script's own time;
//   - `ci-exec run <script> build_script` in the running allocation (the
//     stage script handed to the allocation's agent through the queue dir,
//     output file followed, end marker);
//   - `srun --jobid=ID --overlap bash <script>`: the other way into a
//     running allocation, a job step;
//   - `srun bash <script>`: a fresh allocation, the lowest-latency way to
//     run it on a node at all;
//   - `ci-exec run <script> build_script` with batch.allocate = "stage":
//     one batch job per stage, submitted when the stage starts;
//   - `sbatch --parsable` plus `scontrol show job` every 20 ms until the job
//     ends: the floor for any per-stage batch submission.
//
// Per job: a trivial CI job's driver calls (prepare; prepare_script,
// get_sources, build_script, after_script, cleanup_file_variables; cleanup)
// with executor "shell", with Slurm and an allocation at prepare, and with
// Slurm and one job per stage.
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
	script := filepath.Join(work, "script")
	measure.Must(os.WriteFile(script, []byte(measure.RunnerScript), 0o755))

	driver := func(name, executor, batch string) *measure.Driver {
		dir := filepath.Join(work, name)
		measure.Must(os.MkdirAll(dir, 0o700))
		d, err := measure.NewDriver(dir, fmt.Sprintf("[general]\ndata_dir = %q\nexecutor = %q\n[batch]\n%s\n", filepath.Join(dir, "data"), executor, batch))
		measure.Must(err)
		measure.Must(measure.Command(d.Stage("config"), d.Env, dir)())
		return d
	}
	host := driver("host", "shell", "")
	alloc := driver("alloc", "slurm", `allocate = "prepare"`)
	stage := driver("stage", "slurm", `allocate = "stage"`)

	// The allocation for the per-stage runs: prepared once, and RUNNING
	// before anything is timed.
	measure.Must(measure.Command(alloc.Stage("prepare"), alloc.Env, alloc.Work)())
	id := allocationID(alloc)
	waitRunning(id)
	measure.Must(measure.Command(stage.Stage("prepare"), stage.Env, stage.Work)())

	bare, err := measure.Func("bash script (login node)", 2, *runs, measure.Command([]string{"/bin/bash", script}, host.Env, work))
	measure.Must(err)
	inAlloc, err := measure.Func("ci-exec run, in the allocation", 2, *runs, measure.Command(alloc.Stage("run", script, "build_script"), alloc.Env, alloc.Work))
	measure.Must(err)
	step, err := measure.Func("srun --jobid --overlap bash script", 2, *runs,
		measure.Command([]string{"/usr/bin/srun", "--jobid=" + id, "--overlap", "-N1", "-n1", "/bin/bash", script}, alloc.Env, work))
	measure.Must(err)
	srun, err := measure.Func("srun bash script (new allocation)", 2, *runs, measure.Command([]string{"/usr/bin/srun", "/bin/bash", script}, host.Env, work))
	measure.Must(err)
	perStage, err := measure.Func("ci-exec run, allocate = stage", 1, *runs, measure.Command(stage.Stage("run", script, "build_script"), stage.Env, stage.Work))
	measure.Must(err)
	floor, err := measure.Func("sbatch --parsable + poll 20ms", 1, *runs, func() error { return submitAndPoll(script, host.Env, work) })
	measure.Must(err)
	measure.Must(measure.Command(alloc.Stage("cleanup"), alloc.Env, alloc.Work)())
	measure.Must(measure.Command(stage.Stage("cleanup"), stage.Env, stage.Work)())

	fmt.Println("Per stage:")
	measure.Table(os.Stdout, bare, inAlloc, step, srun, perStage, floor)
	fmt.Printf("\nin the allocation over the script's own time: %+.3f s (median)\n", (inAlloc.Median() - bare.Median()).Seconds())
	fmt.Printf("in the allocation over srun --jobid --overlap: %+.3f s\n", (inAlloc.Median() - step.Median()).Seconds())
	fmt.Printf("in the allocation over srun (new allocation): %+.3f s\n", (inAlloc.Median() - srun.Median()).Seconds())
	fmt.Printf("allocate = stage over the allocation: %+.3f s\n", (perStage.Median() - inAlloc.Median()).Seconds())

	slow := filepath.Join(work, "slow-script")
	measure.Must(os.WriteFile(slow, []byte(strings.Replace(measure.RunnerScript, "( echo hello )", "( sleep 1; echo hello )", 1)), 0o755))
	job := func(d *measure.Driver, sources string) func() error {
		return func() error {
			if err := measure.Command(d.Stage("prepare"), d.Env, d.Work)(); err != nil {
				return err
			}
			for _, st := range []string{"prepare_script", "get_sources", "build_script", "after_script", "cleanup_file_variables"} {
				sc := script
				if st == "get_sources" {
					sc = sources
				}
				if err := measure.Command(d.Stage("run", sc, st), d.Env, d.Work)(); err != nil {
					return err
				}
			}
			return measure.Command(d.Stage("cleanup"), d.Env, d.Work)()
		}
	}
	for _, v := range []struct{ name, sources string }{{"trivial job", script}, {"get_sources takes 1 s", slow}} {
		hostJob, err := measure.Func("executor shell", 1, *runs, job(host, v.sources))
		measure.Must(err)
		allocJob, err := measure.Func("slurm, allocate = prepare", 1, *runs, job(alloc, v.sources))
		measure.Must(err)
		stageJob, err := measure.Func("slurm, allocate = stage", 1, *runs, job(stage, v.sources))
		measure.Must(err)
		fmt.Printf("\nPer job (the driver calls of a job), %s:\n", v.name)
		measure.Table(os.Stdout, hostJob, allocJob, stageJob)
		fmt.Printf("\nallocate = prepare over the host: %+.3f s (median)\n", (allocJob.Median() - hostJob.Median()).Seconds())
		fmt.Printf("allocate = stage over the host: %+.3f s (median)\n", (stageJob.Median() - hostJob.Median()).Seconds())
	}
}

// allocationID reads the prepared allocation's Slurm job id from squeue
// (the job name is ci-1-alloc, the drivers' CI job id being 1).
func allocationID(d *measure.Driver) string {
	out, err := exec.Command("squeue", "-h", "-n", "ci-1-alloc", "-o", "%i").Output()
	measure.Must(err)
	ids := strings.Fields(string(out))
	if len(ids) != 1 {
		measure.Must(fmt.Errorf("expected one allocation ci-1-alloc, squeue lists %q", ids))
	}
	return ids[0]
}

func waitRunning(id string) {
	for i := 0; i < 600; i++ {
		out, _ := exec.Command("squeue", "-h", "-j", id, "-o", "%T").Output()
		if strings.TrimSpace(string(out)) == "RUNNING" {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	measure.Must(fmt.Errorf("allocation %s is not RUNNING after 30 s", id))
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
