package runnerdouble

import (
	"github.com/ci-exec/ci-exec/internal/jobscript"

	"context"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
)

const timeoutDocsHint = "For more control over job and script timeouts see: " +
	"https://docs.gitlab.com/ci/runners/configure_runners/#set-script-and-after_script-timeouts"

// executeScript is common.Build.executeScript: prepare_script, get_sources,
// restore_cache, download_artifacts, the user scripts and after_script,
// archive_cache and upload_artifacts (their _on_failure variants after a
// failure), cleanup_file_variables. A stage with nothing to do (no cache,
// no artifacts, no dependencies) is not called.
func (r *run) executeScript(ctx context.Context) (error, error) {
	err, fault := r.executeStage(ctx, "prepare_script")
	if fault != nil {
		return nil, fault
	}
	if err != nil {
		return fmt.Errorf("prepare environment: %w. "+
			"Check https://docs.gitlab.com/runner/shells/#shell-profile-loading for more information", err), nil
	}

	err, fault = r.executeStage(ctx, "get_sources")
	if fault != nil {
		return nil, fault
	}
	for _, stage := range []string{"restore_cache", "download_artifacts"} {
		if err == nil {
			if err, fault = r.executeStage(ctx, stage); fault != nil {
				return nil, fault
			}
		}
	}

	if err == nil {
		err, fault = r.executeUserScripts(ctx)
		if fault != nil {
			return nil, fault
		}
	}

	// The runner's executeArchiveCache and executeUploadArtifacts: they
	// run after a failure too, and the job's own error wins
	// (pickPriorityError).
	r.failed = err != nil
	archive, upload := "archive_cache", "upload_artifacts_on_success"
	if r.failed {
		archive, upload = "archive_cache_on_failure", "upload_artifacts_on_failure"
	}
	aerr, fault := r.executeStage(ctx, archive)
	if fault != nil {
		return nil, fault
	}
	uerr, fault := r.executeStage(ctx, upload)
	if fault != nil {
		return nil, fault
	}
	if err == nil {
		err = aerr
	}
	if err == nil {
		err = uerr
	}

	cerr, fault := r.executeStage(ctx, "cleanup_file_variables")
	if fault != nil {
		return nil, fault
	}
	if cerr != nil {
		r.runnerLogf("WARNING: Error while executing file based variables removal script: %v", cerr)
	}
	return err, nil
}

// executeUserScripts is common.Build.executeUserScripts: the user steps
// under a cancelable script context, then after_script with CI_JOB_STATUS.
func (r *run) executeUserScripts(ctx context.Context) (error, error) {
	scriptCtx, scriptCancel := context.WithCancel(ctx)
	defer scriptCancel()
	// From here a cancel only ends the script context (cancel_gracefully).
	r.setCancel(scriptCancel)

	var err, fault error
	for _, s := range r.job.steps() {
		if s.Name == "after_script" {
			continue
		}
		err, fault = r.executeStage(scriptCtx, jobscript.StepStage(s))
		if fault != nil {
			return nil, fault
		}
		if err != nil {
			break
		}
	}
	if ctx.Err() == nil && errors.Is(scriptCtx.Err(), context.Canceled) {
		err = &buildError{inner: errJobCanceled, reason: InternalReasonJobCanceled}
		r.warnln("script canceled externally (UI, API)")
	}

	afterCtx, afterCancel := context.WithTimeout(ctx, r.cfg.AfterScriptTimeout)
	defer afterCancel()
	r.jobStatus, _ = r.runtimeStateAndError(err)
	aerr, fault := r.executeStage(afterCtx, "after_script")
	if fault != nil {
		return nil, fault
	}
	if aerr != nil && !errors.Is(ctx.Err(), context.DeadlineExceeded) {
		if r.variableValue("AFTER_SCRIPT_IGNORE_ERRORS") != "false" {
			r.warnln("after_script failed, but job will continue unaffected:", aerr)
		} else if err == nil {
			err = aerr
		}
	}
	return err, nil
}

// variableValue returns the last value of a job variable ("" if unset).
func (r *run) variableValue(key string) string {
	val := ""
	for _, v := range r.variables() {
		if v.Key == key {
			val = v.Value
		}
	}
	return val
}

func (r *run) scriptContext() jobscript.Context {
	return jobscript.Context{
		Vars:         r.variables(),
		BuildsDir:    r.buildsDir,
		CacheDir:     r.cacheDir,
		ProjectDir:   r.projectDir,
		ProjectPath:  r.job.ProjectFullPath,
		Hostname:     r.hostname,
		GitStrategy:  r.variableValue("GIT_STRATEGY"),
		RepoURL:      r.job.repoURL(),
		Sha:          r.job.Sha,
		Ref:          "main",
		Refspecs:     r.job.refspecs(),
		Steps:        r.job.steps(),
		JobID:        r.job.ID,
		Token:        r.job.Token,
		ServerURL:    ServerURL,
		Cache:        r.job.Cache,
		Artifacts:    r.job.Artifacts,
		Dependencies: r.job.Dependencies,
	}
}

// executeStage is common.Build.executeStage plus the custom executor's Run:
// a new script file per stage and run_exec run_args... <script> <stage>.
func (r *run) executeStage(ctx context.Context, stage string) (error, error) {
	if err := ctx.Err(); err != nil {
		return err, nil
	}
	script, ok, err := r.scriptContext().StageScript(stage, r.shell)
	if err != nil {
		return err, nil
	}
	if !ok {
		return nil, nil
	}
	r.logln(jobscript.StageDescription(stage))
	defer func() {
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			r.warnln(stage + " could not run to completion because the timeout was exceeded. " + timeoutDocsHint)
		}
	}()

	dir, err := os.MkdirTemp(r.tmp, "script")
	if err != nil {
		return nil, fmt.Errorf("runnerdouble: %w", err)
	}
	if err := r.chown(dir); err != nil {
		return nil, err
	}
	file := filepath.Join(dir, "script")
	if err := os.WriteFile(file, []byte(script), 0o700); err != nil {
		return nil, fmt.Errorf("runnerdouble: %w", err)
	}
	if err := r.chown(file); err != nil {
		return nil, err
	}

	runStage := stage
	if stage == "step_script" {
		r.warnln("Starting with version 17.0 the 'build_script' stage will be replaced with 'step_script': " +
			"https://gitlab.com/groups/gitlab-org/-/epics/6112")
		runStage = "build_script"
	}
	args := append(append([]string(nil), r.cfg.RunArgs...), file, runStage)
	err = r.exec(ctx, callSpec{
		kind:       KindRun,
		stage:      runStage,
		args:       args,
		env:        r.env(true),
		scriptPath: file,
		out:        r.log,
	})
	r.log.flush()
	return err, nil
}

// StageScript returns the script the double would hand run_exec for stage
// (the runner's stage name, e.g. "get_sources") of job, for builds and
// cache dirs buildsDir and cacheDir (builds dir not shared), without
// running anything: for unit tests of code that reads the runner's
// scripts. ok is false when the runner would skip the stage.
func (c Config) StageScript(job Job, stage, buildsDir, cacheDir string) (script string, ok bool, err error) {
	job = job.withDefaults()
	r := &run{cfg: c.withDefaults(), job: job, jobStatus: "running", shell: "bash",
		buildsDir: buildsDir, cacheDir: cacheDir, projectDir: path.Join(buildsDir, job.ProjectFullPath)}
	return r.scriptContext().StageScript(stage, r.shell)
}
