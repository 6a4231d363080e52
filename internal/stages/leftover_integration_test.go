package stages_test

// A stage ends when its script ends: what the script leaves running (a
// process in a session of its own, a double fork, a daemon holding the
// stage's stdout and stderr) is stopped before the stage returns, on the
// host, in each container runtime and in a Slurm job, and the job log says
// so in one line. Each leftover would run 300 s: a stage that waited for
// one would run into the job's timeout, which the tests check; the pids
// the script wrote, and the job's marker, show that nothing is left.

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/runnerdouble"
	"github.com/ci-exec/ci-exec/internal/testenv"
)

// leftoverNames are the pid files the leftover script writes, in the
// project dir.
var leftoverNames = []string{"left-setsid.pid", "left-daemon.pid", "left-double.pid"}

// leftoverScript starts three leftovers and ends: one in a session of its
// own with its output elsewhere, one daemon that keeps the stage's stdout
// and stderr, one behind a double fork. It waits until each has become
// sleep (past setsid and exec) so the job log's line is exact.
func leftoverScript() []string {
	return []string{
		`running() { until [ "$(cat /proc/$1/comm 2>/dev/null)" = sleep ]; do :; done; }`,
		`setsid sleep 300 > /dev/null 2>&1 < /dev/null & echo $! > left-setsid.pid; running $!`,
		`setsid sleep 300 & echo $! > left-daemon.pid; running $!`,
		`(setsid sleep 300 & echo $! > left-double.pid) & wait $!; running $(cat left-double.pid)`,
		`echo script-done`,
	}
}

// leftoverJob is j with the leftover script, a marker variable that every
// process of the job carries, and a timeout the stage would run into if it
// waited for a leftover.
func leftoverJob(j runnerdouble.Job) (runnerdouble.Job, string) {
	marker := fmt.Sprintf("CI_EXEC_MARKER_%d", time.Now().UnixNano())
	if j.Variables == nil {
		j.Variables = map[string]string{}
	}
	j.Variables["PROC_MARKER"] = marker
	j.Script = leftoverScript()
	j.AfterScript = []string{`echo "after status=$CI_JOB_STATUS"`}
	j.Timeout = 2 * time.Minute
	return j, marker
}

// hasMarker reports whether pid is a live process carrying marker (a pid
// written inside a PID namespace may name some other host process).
func hasMarker(pid int, marker string) bool {
	for _, p := range runnerdouble.ProcessesWithMarker(marker) {
		if p == pid {
			return true
		}
	}
	return false
}

// assertLeftoversStopped checks a job that ran the leftover script (and
// more leftovers, whose pid files are extraFiles): it succeeded
// without waiting for them, the log has the one line, and none of them,
// nor any other process of the job, is left.
func assertLeftoversStopped(t *testing.T, res *runnerdouble.Result, marker string, extraFiles ...string) {
	t.Helper()
	require.True(t, res.Succeeded(), "the stage must end when its script does: %s", res.Error)
	assert.Contains(t, res.Log, "script-done")
	if ownPIDNamespace(res) {
		// Apptainer runs every stage with --pid: the kernel ends the
		// container's processes when its first one exits, before ci-exec
		// looks, so there is nothing to stop or name; and the pids the
		// script wrote are the container's own. Only the marker can tell.
		assert.NotContains(t, res.Log, "the stage left running")
		assert.Empty(t, runnerdouble.ProcessesWithMarker(marker), "processes of the job left running")
		return
	}
	files := append(append([]string(nil), leftoverNames...), extraFiles...)
	assert.Contains(t, res.Log, fmt.Sprintf("stopped %d processes the stage left running: sleep\n", len(files)))
	assert.Equal(t, 1, strings.Count(res.Log, "the stage left running"), "one line, for build_script only")
	assert.Contains(t, res.Log, "after status=success")
	for _, name := range files {
		b, err := os.ReadFile(filepath.Join(res.ProjectDir, name))
		if !assert.NoError(t, err, "the script wrote %s", name) {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		require.NoError(t, err)
		assert.False(t, hasMarker(pid, marker), "%s: process %d is still running", name, pid)
	}
	assert.Empty(t, runnerdouble.ProcessesWithMarker(marker), "processes of the job left running")
}

// ownPIDNamespace reports whether the job's container stages ran in a PID
// namespace of their own (Apptainer's --pid).
func ownPIDNamespace(res *runnerdouble.Result) bool {
	return strings.Contains(res.Log, "apptainer exec ") && strings.Contains(res.Log, " --pid ") ||
		strings.Contains(res.Log, "/podman --root ") // every podman container has its own
}

func TestHostLeftoversAreStopped(t *testing.T) {
	for _, u := range hostUsers(t) {
		t.Run(u.Name, func(t *testing.T) {
			c, _ := hostRunner(t, u, `kill_timeout = "10s"`)
			j, marker := leftoverJob(runnerdouble.Job{})
			// nohup, too, only makes a process ignore SIGHUP.
			j.Script = append(j.Script[:len(j.Script)-1], `nohup setsid sleep 300 > /dev/null 2>&1 & echo $! > left-nohup.pid; running $!`, `echo script-done`)
			assertLeftoversStopped(t, runJob(t, c, j), marker, "left-nohup.pid")
		})
	}
}

func TestContainerLeftoversAreStopped(t *testing.T) {
	forEachRuntimeAndUser(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		// A converted image runs differently (ch-run serves the SquashFS
		// itself, from a process of its own).
		for name, table := range map[string]string{"stored": `pull_policy = "if-not-present"`, "converted": "convert = true"} {
			t.Run(name, func(t *testing.T) {
				e := containerRunner(t, rt, u, "", table)
				j, marker := leftoverJob(tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE")))
				res := runJob(t, e.runner, j)
				assertLeftoversStopped(t, res, marker)
			})
		}
	})
}

func TestBatchLeftoversAreStopped(t *testing.T) {
	for _, u := range testenv.Users(t) {
		t.Run(u.Name, func(t *testing.T) {
			c, _ := slurmRunner(t, u, "", "")
			j, marker := leftoverJob(batchJob())
			res := runJob(t, c, j)
			assertLeftoversStopped(t, res, marker)
			assert.Contains(t, res.Log, "Submitted Slurm allocation")
			assertNoSlurmJob(t, j)
		})
	}
}

func TestBatchInContainerLeftoversAreStopped(t *testing.T) {
	for _, rt := range runtimes(t) {
		t.Run(rt.name, func(t *testing.T) {
			testenv.RequireBinary(t, rt.program)
			u := testenv.Unprivileged(t)
			e := containerRunner(t, rt, u, `executor = "slurm"`, "")
			j, marker := leftoverJob(tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE")))
			j.ID = batchJobID.Add(1)
			res := runJob(t, e.runner, j)
			assertLeftoversStopped(t, res, marker)
			assertNoSlurmJob(t, j)
		})
	}
}

// On cancel, the escaped processes get SIGTERM with the script and are all
// gone when the stage returns; their own TERM traps run.
func TestLeftoversOnCancel(t *testing.T) {
	script := []string{
		`setsid sh -c 'trap "echo leftover-got-TERM; exit 0" TERM; sleep 300 & wait' &`,
		`echo $! > left-trap.pid`,
		`until [ "$(cat /proc/$(cat left-trap.pid)/comm 2>/dev/null)" = sh ] && [ -n "$(cat /proc/$(cat left-trap.pid)/task/*/children 2>/dev/null)" ]; do :; done`,
		`echo started`,
		`sleep 1000`,
	}
	check := func(t *testing.T, res *runnerdouble.Result, marker string) {
		t.Helper()
		assert.Equal(t, runnerdouble.InternalReasonJobCanceled, res.InternalFailureReason)
		assert.Contains(t, res.Log, "leftover-got-TERM", "the escaped process got SIGTERM when the stage was cancelled")
		build := res.Call("build_script")
		require.NotNil(t, build)
		assert.False(t, build.ForceKilled, "ci-exec ended within the runner's grace period")
		assert.Empty(t, runnerdouble.ProcessesWithMarker(marker), "processes of the job left running")
	}
	cancelJob := func(j runnerdouble.Job) (runnerdouble.Job, string) {
		j, marker := leftoverJob(j)
		j.Script = script
		j.CancelOnLog = "started"
		return j, marker
	}
	t.Run("host", func(t *testing.T) {
		for _, u := range hostUsers(t) {
			t.Run(u.Name, func(t *testing.T) {
				c, _ := hostRunner(t, u, `kill_timeout = "5s"`)
				j, marker := cancelJob(runnerdouble.Job{})
				check(t, runJob(t, c, j), marker)
			})
		}
	})
	t.Run("container", func(t *testing.T) {
		forEachRuntimeAndUser(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
			e := containerRunner(t, rt, u, "", `pull_policy = "if-not-present"`)
			j, marker := cancelJob(tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE")))
			check(t, runJob(t, e.runner, j), marker)
		})
	})
	t.Run("slurm", func(t *testing.T) {
		u := testenv.Unprivileged(t)
		c, _ := slurmRunner(t, u, "", "")
		j, marker := cancelJob(batchJob())
		res := runJob(t, c, j)
		check(t, res, marker)
		assertNoSlurmJob(t, j)
	})
}

// prepare, too, ends what it starts: an admin's prep_script that leaves a
// process in a session of its own (output elsewhere, and one holding the
// job log's pipe) does not hold prepare, and the process does not outlive
// it (prepare is a subreaper, and what reparents to it is ended).
func TestPrepScriptLeftoversAreStopped(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		dir := testenv.PrivateDir(t, u)
		quiet, holding := filepath.Join(dir, "prep-quiet.pid"), filepath.Join(dir, "prep-holding.pid")
		prep := filepath.Join(dir, "prep.sh")
		require.NoError(t, os.WriteFile(prep, []byte(fmt.Sprintf(`#!/bin/sh
running() { until [ "$(cat /proc/$1/comm 2>/dev/null)" = sleep ]; do :; done; }
setsid sleep 300 > /dev/null 2>&1 < /dev/null & echo $! > %s; running $!
setsid sleep 300 & echo $! > %s; running $!
echo prep-done
`, quiet, holding)), 0o755))
		e := containerRunner(t, rt, u, "", fmt.Sprintf("prep_script = %q\npull_policy = \"if-not-present\"", prep))
		j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
		j.Script = []string{"echo job-ran"}
		j.Timeout = 2 * time.Minute
		res := runJob(t, e.runner, j)
		require.True(t, res.Succeeded(), res.Error)
		assert.Contains(t, res.Log, "prep-done")
		assert.Contains(t, res.Log, "job-ran")
		for _, f := range []string{quiet, holding} {
			b, err := os.ReadFile(f)
			require.NoError(t, err)
			pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
			require.NoError(t, err)
			p, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
			assert.True(t, err != nil || string(p) != "sleep\n", "%s: process %d is still running", filepath.Base(f), pid)
		}
	})
}

// With Apptainer's --pid the kernel ends the container's processes when
// its first one exits: the stage ends as promptly, and nothing is left
// (the pids the script wrote are the container's own, so only the
// marker can tell).
func TestApptainerPidNamespaceLeftovers(t *testing.T) {
	forEachRuntimeAndUser(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		e := containerRunner(t, rt, u, "", `pull_policy = "if-not-present"`)
		j, marker := leftoverJob(tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE")))
		j.Variables[rt.argsVar] = "--pid"
		res := runJob(t, e.runner, j)
		require.True(t, res.Succeeded(), "the stage must end when its script does: %s", res.Error)
		assert.Contains(t, res.Log, "script-done")
		assert.Empty(t, runnerdouble.ProcessesWithMarker(marker), "processes of the job left running")
	}, func(rt runtimeFixture) bool { return rt.name == "apptainer" })
}
