// Package runnerdouble is a test double of gitlab-runner's custom executor.
// The stage scripts it hands the driver are written by internal/jobscript,
// which `ci-exec exec` (internal/localjob) uses too; this package adds what
// only a test needs (the payload GitLab would send, retries, cancel, the
// fake helper, call records).
//
// It drives a custom-executor driver binary (config_exec, prepare_exec,
// run_exec, cleanup_exec) exactly the way gitlab-runner 19.4.0 does, so that
// integration tests, benchmarks and demos can exercise the built ci-exec
// binary without a GitLab instance or a real runner. The behaviour follows
// /work/shared/reference/runner-contract.md (§3-§9 and §13):
//
//   - one per-job temp dir ("custom-executor*") that is the cwd and TMPDIR of
//     every call, holding response.json (mode 0600, the §5.2 job payload);
//   - the environment of every call in the runner's order: base env, TMPDIR,
//     BUILD_FAILURE_EXIT_CODE=1, SYSTEM_FAILURE_EXIT_CODE=2,
//     BUILD_EXIT_CODE_FILE, JOB_RESPONSE_FILE, config_exec's job_env (not for
//     config_exec itself), then every job variable as CUSTOM_ENV_<KEY> and
//     CUSTOM_ENV_CI_JOB_SERVICES;
//   - config_exec's stdout decoded as api.ConfigExecOutput, its stderr to
//     the job log;
//   - prepare retried up to three times for non-build errors, with
//     cleanup_exec after each failed attempt;
//   - one new <tmp>/scriptNNNN/script (mode 0700) per run stage, written like
//     the runner's bash shell writer (the same preamble, the body in
//     eval $'...', words quoted with the runner's ShellEscape, or
//     PosixShellEscape and ": | eval" under FF_POSIXLY_CORRECT_ESCAPES and
//     FF_USE_LEGACY_BASH_EVAL), and run_exec called as
//     run_args... <script> <stage> in the §6 stage order;
//   - with Job.Cache, Job.Artifacts and Job.Dependencies the runner's
//     restore_cache, download_artifacts, archive_cache[_on_failure] and
//     upload_artifacts_on_{success,failure} stages, calling the helper as the
//     runner does ("gitlab-runner artifacts-uploader --url ... --token
//     <job token> --id ..."); ./fakehelper is a gitlab-runner stand-in that
//     records its own argv (HelperCalls);
//   - get_sources as the runner writes it (internal/jobscript): for GIT_STRATEGY
//     fetch and clone the git template dir, the external git config with
//     the runner's insteadOf rules carrying the job token (or, under
//     FF_GIT_URLS_WITHOUT_TOKENS, its credential helper), git init, fetch,
//     checkout and the submodule commands, against Job.RepoURL (which gets
//     the job token in it, as GitLab sends it) at Job.Sha;
//     Config.StageScript returns any stage's script without running it;
//   - every call a new process in its own process group, stdin not
//     connected; on job timeout or cancel SIGTERM to the group, SIGKILL after
//     the graceful kill timeout, give up after the force kill timeout;
//   - exit codes mapped as the runner does (BUILD_EXIT_CODE_FILE, system and
//     unknown failures), cleanup_exec always run, its status ignored.
//
// Config.Run returns a Result with the job log the runner would show, the
// separate runner log (cleanup_exec output), the final state and failure
// reason, and a record of every driver call. ProcessesInGroup and
// ProcessesWithMarker let tests assert that nothing was left running.
package runnerdouble
