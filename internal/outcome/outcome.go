// Package outcome is what an executor (local, Slurm) reports about one
// stage's command once it is over, as plain data: the executors only
// observe, and one function in package stages decides the exit class from
// it. It also defines the start signal by which a command tells the
// executor that the stage's script itself began.
//
// It is a leaf package: executors and stages import it, it imports
// nothing of ci-exec.
package outcome

// Outcome is how one stage's command ended.
type Outcome struct {
	// Where is "host" or the image the stage ran in (for messages).
	Where string
	// Program is the program the executor ran ("ch-run", "apptainer",
	// "bash"), for messages.
	Program string
	// Runtime is the container runtime's name ("charliecloud"), "" on the
	// host.
	Runtime string
	// JobID is the Slurm job id ("" locally).
	JobID string
	// State is Slurm's final JobState (COMPLETED, FAILED, TIMEOUT, ...),
	// Vanished or PendingLimit; "" locally.
	State string

	// Exited is true when ExitCode is the command's own status: always
	// locally, under Slurm when the batch script's end marker was seen
	// (Marker), or Slurm's ExitCode= otherwise.
	Exited bool
	// ExitCode is the exit status (128+N after signal N, as a shell
	// reports it).
	ExitCode int
	// Signal is the signal that ended the command, when known (0: none).
	Signal int
	// Marker is true under Slurm when the batch script reported the
	// command's end (its exit code is then exact).
	Marker bool
	// Started is true when the stage's script is known to have begun: the
	// start signal arrived (StartCommand), or the executor started the
	// script's shell itself. False with a non-zero exit means the runtime
	// (or the node) failed before the script.
	Started bool
	// Diagnosis is what looks like the runtime's own error line in the
	// command's stderr (the runtime's Diagnose: ch-run's "error:" line
	// with exit 1, apptainer's FATAL line with 255). Any script can print
	// such a line too, so it explains a failure only when Started is
	// false.
	Diagnosis string
	// UserArgsVariable is set when the command carried the user's own
	// runtime arguments from that variable: a runtime failure is then
	// most likely theirs.
	UserArgsVariable string

	// Stopped is true when the stage was stopped (the runner cancelled it,
	// or its timeout passed) and the command signalled.
	Stopped bool
	// Killed is true when SIGKILL was needed after the grace period.
	Killed bool
	// PendingReason is Slurm's reason when the pending limit cancelled the
	// job.
	PendingReason string
	// Detail is the executor's own explanation of a pseudo-state
	// (Vanished: what scontrol said).
	Detail string
	// LeftBehind names the processes the stage left running that were
	// stopped after it.
	LeftBehind []string
}

// Pseudo-states of Outcome.State that are not Slurm's.
const (
	// Vanished: Slurm stopped knowing the job without a final state.
	Vanished = "VANISHED"
	// PendingLimit: the job pended longer than batch.pending_limit and
	// was cancelled.
	PendingLimit = "PENDING_LIMIT"
)
