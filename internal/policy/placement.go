package policy

// Where a stage runs.
type Placement int

const (
	// OnHost runs the stage's script on the host, as without a mechanism.
	OnHost Placement = iota
	// InJobImage runs it in the job's image (or default_image).
	InJobImage
	// InRunnerImage runs it in the admin's runner_image.
	InRunnerImage
)

func (p Placement) String() string {
	switch p {
	case InJobImage:
		return "job image"
	case InRunnerImage:
		return "runner image"
	default:
		return "host"
	}
}

// IsRunnerStage reports whether a stage is the runner's own work (git,
// caches, artifacts, file variables) rather than the job's code. Unknown
// names are NOT runner stages: a future runner's new step must run where
// user code runs, never escape the container onto the host.
func IsRunnerStage(stage string) bool {
	switch stage {
	case "prepare_script", "get_sources", "clear_worktree", "restore_cache", "download_artifacts",
		"archive_cache", "archive_cache_on_failure", "upload_artifacts_on_success",
		"upload_artifacts_on_failure", "cleanup_file_variables":
		return true
	}
	return false
}

// PlacementPolicy is the part of the configuration that places stages.
type PlacementPolicy struct {
	// HasJobImage is false when the job runs on the host (no image and no
	// forced default): then no stage uses a container, as in seed 004's
	// "hello-host" example, and runner_image is not even pulled.
	HasJobImage bool
	// HasRunnerImage is true when runner_image is set.
	HasRunnerImage bool
	// StepScriptOnly limits containers to the job's script steps
	// (build_script, step_*, unknown stages): after_script and the runner's
	// stages stay on the host, and runner_image is not used.
	StepScriptOnly bool
}

// Place decides where stage runs (seed 004): the job's script stages and
// after_script in the job's image; the runner's stages in runner_image when
// set, else on the host; step_script_only keeps everything but the script
// steps on the host.
func (p PlacementPolicy) Place(stage string) Placement {
	if !p.HasJobImage {
		return OnHost
	}
	if IsRunnerStage(stage) {
		if p.HasRunnerImage && !p.StepScriptOnly {
			return InRunnerImage
		}
		return OnHost
	}
	if stage == "after_script" && p.StepScriptOnly {
		return OnHost
	}
	return InJobImage
}
