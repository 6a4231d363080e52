package stages

import (
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/outcome"
)

func TestClassify(t *testing.T) {
	const (
		chErr = "ch-run[4242]: error: can't mkdir: /var/tmp/x: Read-only file system (ch_misc.c:409 30)"
		fatal = "FATAL:   container creation failed: mount /data->/data error: mount source /data doesn't exist"
		img   = "in reg.example/ci/app:1 with charliecloud"
	)
	// Local outcomes: the executor saw the exit status itself.
	local := func(o outcome.Outcome) outcome.Outcome {
		o.Exited = true
		if o.Where == "" {
			o.Where, o.Program, o.Runtime = img, "ch-run", "charliecloud"
		}
		return o
	}
	// Slurm outcomes: job 42, a final state, the end marker as given.
	slurm := func(state string, o outcome.Outcome) outcome.Outcome {
		o.JobID, o.State = "42", state
		o.Exited = o.Marker
		if o.Where == "" {
			o.Where, o.Program, o.Runtime = img, "ch-run", "charliecloud"
		}
		return o
	}
	tests := map[string]struct {
		o     outcome.Outcome
		class failure.Class // ignored when ok
		ok    bool
		code  int
		msg   string
	}{
		// Local.
		"success":                        {o: local(outcome.Outcome{Started: true}), ok: true},
		"host script exits 3":            {o: local(outcome.Outcome{Where: "host", Program: "bash", ExitCode: 3, Started: true}), class: failure.Script, code: 3},
		"container script exits 1":       {o: local(outcome.Outcome{ExitCode: 1, Started: true}), class: failure.Script, code: 1},
		"killed by SIGKILL":              {o: local(outcome.Outcome{ExitCode: 137, Signal: 9, Started: true}), class: failure.Script, code: 137},
		"ch-run fails before the script": {o: local(outcome.Outcome{ExitCode: 1, Diagnosis: chErr}), class: failure.System, msg: "could not run the build_script stage " + img + ": " + chErr},
		"ch-run fails, user's args on the line": {o: local(outcome.Outcome{ExitCode: 1, Diagnosis: chErr, UserArgsVariable: "JACAMAR_CI_CHARLIECLOUD_ARGS"}),
			class: failure.User, msg: chErr + "; check the arguments in JACAMAR_CI_CHARLIECLOUD_ARGS"},
		"runtime fails without a line it knows": {o: local(outcome.Outcome{ExitCode: 2}), class: failure.System, msg: "ch-run exited 2 before the script started"},
		"runtime missing locally (start error)": {o: local(outcome.Outcome{ExitCode: 127, Diagnosis: "start /usr/bin/ch-run: no such file or directory", UserArgsVariable: "X"}),
			class: failure.System, msg: "start /usr/bin/ch-run: no such file or directory"},
		// Diagnose false positives: the line is there, but the script ran.
		"script prints a ch-run error line, exits 1": {o: local(outcome.Outcome{ExitCode: 1, Diagnosis: chErr, Started: true}), class: failure.Script, code: 1},
		"Perl die 255 after a FATAL: line": {o: local(outcome.Outcome{Where: "in x with apptainer", Program: "apptainer", Runtime: "apptainer", ExitCode: 255, Diagnosis: "FATAL: cannot open config", Started: true}),
			class: failure.Script, code: 255},
		"apptainer FATAL before the script": {o: local(outcome.Outcome{Where: "in x with apptainer", Program: "apptainer", Runtime: "apptainer", ExitCode: 255, Diagnosis: fatal}),
			class: failure.System, msg: fatal},
		"stopped, script trapped TERM and exited 0": {o: local(outcome.Outcome{Stopped: true, Started: true}), ok: true},
		"stopped, killed":                   {o: local(outcome.Outcome{Stopped: true, Killed: true, ExitCode: 137, Started: true}), class: failure.Script, code: 137},
		"stopped before the script started": {o: local(outcome.Outcome{Stopped: true, ExitCode: 143}), class: failure.Script, code: 143},

		// Slurm.
		"COMPLETED, marker rc 0":   {o: slurm("COMPLETED", outcome.Outcome{Marker: true, Started: true}), ok: true},
		"FAILED, marker rc 7":      {o: slurm("FAILED", outcome.Outcome{Marker: true, ExitCode: 7, Started: true}), class: failure.Script, code: 7},
		"FAILED with marker rc 0":  {o: slurm("FAILED", outcome.Outcome{Marker: true, Started: true}), ok: true},
		"FAILED without marker":    {o: slurm("FAILED", outcome.Outcome{ExitCode: 1}), class: failure.System, msg: "Slurm job 42 failed (exit code 1, signal 0) without reporting the end"},
		"COMPLETED without marker": {o: slurm("COMPLETED", outcome.Outcome{}), ok: true},
		"rc 127 + marker, runtime missing on the node": {o: slurm("FAILED", outcome.Outcome{Marker: true, ExitCode: 127, UserArgsVariable: "JACAMAR_CI_CHARLIECLOUD_ARGS"}),
			class: failure.System, msg: "could not run the build_script stage " + img + " (Slurm job 42, on its compute node): ch-run exited 127 before the script started (is ch-run installed and executable there?)"},
		"rc 127 + marker, bash missing on the node": {o: slurm("FAILED", outcome.Outcome{Where: "host", Program: "/bin/bash", Marker: true, ExitCode: 127}),
			class: failure.System, msg: "stage on the host (Slurm job 42, on its compute node): /bin/bash exited 127"},
		"rc 127 + marker, the script's own command not found": {o: slurm("FAILED", outcome.Outcome{Marker: true, ExitCode: 127, Started: true}), class: failure.Script, code: 127},
		"ch-run error on the node":                            {o: slurm("FAILED", outcome.Outcome{Marker: true, ExitCode: 1, Diagnosis: chErr}), class: failure.System, msg: "on its compute node): " + chErr},
		"script prints a ch-run error on the node":            {o: slurm("FAILED", outcome.Outcome{Marker: true, ExitCode: 1, Diagnosis: chErr, Started: true}), class: failure.Script, code: 1},
		"OUT_OF_MEMORY without marker":                        {o: slurm("OUT_OF_MEMORY", outcome.Outcome{Signal: 9}), class: failure.User, msg: "Slurm job 42 ran out of memory; ask for more with --mem"},
		"OUT_OF_MEMORY, marker rc 137":                        {o: slurm("OUT_OF_MEMORY", outcome.Outcome{Marker: true, ExitCode: 137, Started: true}), class: failure.User, msg: "ran out of memory"},
		"OUT_OF_MEMORY, but the script succeeded":             {o: slurm("OUT_OF_MEMORY", outcome.Outcome{Marker: true, Started: true}), ok: true},
		"NODE_FAIL":                                 {o: slurm("NODE_FAIL", outcome.Outcome{}), class: failure.System, msg: "Slurm job 42 ended NODE_FAIL: the cluster, not the script, stopped it"},
		"NODE_FAIL after a failing script":          {o: slurm("NODE_FAIL", outcome.Outcome{Marker: true, ExitCode: 2, Started: true}), class: failure.System, msg: "ended NODE_FAIL"},
		"PREEMPTED, script trapped TERM, 143":       {o: slurm("PREEMPTED", outcome.Outcome{Marker: true, ExitCode: 143, Started: true}), class: failure.System, msg: "ended PREEMPTED"},
		"PREEMPTED after the script succeeded":      {o: slurm("PREEMPTED", outcome.Outcome{Marker: true, Started: true}), ok: true},
		"BOOT_FAIL":                                 {o: slurm("BOOT_FAIL", outcome.Outcome{}), class: failure.System, msg: "ended BOOT_FAIL"},
		"TIMEOUT":                                   {o: slurm("TIMEOUT", outcome.Outcome{Signal: 15}), class: failure.User, msg: "reached its time limit"},
		"TIMEOUT, script trapped TERM and exited 0": {o: slurm("TIMEOUT", outcome.Outcome{Marker: true, Started: true}), class: failure.User, msg: "reached its time limit"},
		"DEADLINE":                                  {o: slurm("DEADLINE", outcome.Outcome{}), class: failure.User, msg: "reached its --deadline"},
		"CANCELLED by someone else":                 {o: slurm("CANCELLED", outcome.Outcome{Signal: 15}), class: failure.User, msg: "cancelled outside ci-exec"},
		"pending limit": {o: slurm(outcome.PendingLimit, outcome.Outcome{Detail: "batch.pending_limit (30m0s)", PendingReason: "Resources"}),
			class: failure.System, msg: "Slurm job 42 was still pending after batch.pending_limit (30m0s), reason Resources; it was cancelled"},
		"vanished":                      {o: slurm(outcome.Vanished, outcome.Outcome{Detail: "the job vanished: Slurm has not known job 42 for 1m0s"}), class: failure.System, msg: "Slurm job 42: the job vanished"},
		"unknown state":                 {o: slurm("SPECIAL_EXIT", outcome.Outcome{}), class: failure.System, msg: "ended in state SPECIAL_EXIT"},
		"stopped, no marker":            {o: slurm("CANCELLED", outcome.Outcome{Stopped: true}), class: failure.Script, code: 143},
		"stopped, marker rc 5":          {o: slurm("CANCELLED", outcome.Outcome{Stopped: true, Marker: true, ExitCode: 5, Started: true}), class: failure.Script, code: 5},
		"stopped, Slurm lost it (GONE)": {o: slurm("GONE", outcome.Outcome{Stopped: true, Killed: true}), class: failure.Script, code: 143},
		"stopped while submitting":      {o: outcome.Outcome{Stopped: true}, class: failure.Script, code: 143},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			err := classify("build_script", tc.o)
			if tc.ok {
				assert.NoError(t, err)
				return
			}
			if !assert.Error(t, err) {
				return
			}
			assert.Equal(t, tc.class, failure.ClassOf(err), "%v", err)
			if tc.class == failure.Script {
				assert.Equal(t, tc.code, failure.CodeOf(err))
			}
			assert.Contains(t, err.Error(), tc.msg)
		})
	}
}
