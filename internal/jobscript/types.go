// Package jobscript writes the stage scripts gitlab-runner 19.4 hands a
// custom executor's run_exec (its bash shell writer, shells/bash.go, and
// the stage bodies of shells/abstract.go): the same preamble, the body in
// eval $'...', words quoted with the runner's ShellEscape (or
// PosixShellEscape under FF_POSIXLY_CORRECT_ESCAPES), every user command
// echoed as "$ command" before it runs. Unlike the runner its notices
// carry no ANSI colours, so a log stays plain text.
//
// Two users: `ci-exec exec` (internal/localjob), which runs a job of a
// .gitlab-ci.yml through ci-exec's own stages without a runner, and the
// runner test double (internal/runnerdouble). Both must hand the stages
// exactly what a real runner would, so that a local job goes through the
// same script checks and rewriting (internal/runnerscript) as a CI job.
// The fixtures in /work/shared/reference/runner-scripts are what a real
// runner wrote; the tests of internal/runnerdouble compare against them.
package jobscript

// Variable is one job variable as in the job payload's "variables" array.
type Variable struct {
	// Key is the variable name.
	Key string `json:"key"`
	// Value is the variable value.
	Value string `json:"value"`
	// Public is true for non-secret variables.
	Public bool `json:"public"`
	// Masked is true for variables masked in the job log.
	Masked bool `json:"masked"`
	// File is true for file-type variables (never set here).
	File bool `json:"file"`
	// Raw is true for variables that are not expanded.
	Raw bool `json:"raw"`
}

// Step is one entry of the payload's "steps": Name is "script",
// "after_script", "release" or any other step name; each step except
// after_script becomes the run stage "step_<name>" ("step_script" is
// passed to run_exec as "build_script").
type Step struct {
	// Name is the payload step name.
	Name string
	// Script is the step's command lines.
	Script []string
}

// Cache is a job's cache: entry.
type Cache struct {
	// Key is the cache key; default "default".
	Key string
	// Paths are the paths archived (relative to the project dir).
	Paths []string
	// When is "on_success" (default), "on_failure" or "always".
	When string
}

// KeyOrDefault is the cache key the runner uses.
func (c *Cache) KeyOrDefault() string {
	if c.Key == "" {
		return "default"
	}
	return c.Key
}

// RunsOn reports whether the archive stage runs for a job that failed or not.
func (c *Cache) RunsOn(failed bool) bool { return WhenAllows(c.When, failed) }

// Artifacts is a job's artifacts: entry.
type Artifacts struct {
	// Name is the archive name (--name); "" leaves the flag out.
	Name string
	// Paths are the paths uploaded (relative to the project dir).
	Paths []string
	// When is "on_success" (default), "on_failure" or "always".
	When string
	// ExpireIn is --expire-in; "" leaves the flag out.
	ExpireIn string
}

// RunsOn reports whether the upload stage runs for a job that failed or not.
func (a *Artifacts) RunsOn(failed bool) bool { return WhenAllows(a.When, failed) }

// WhenAllows is GitLab's when: on_success (default), on_failure, always.
func WhenAllows(when string, failed bool) bool {
	switch when {
	case "always":
		return true
	case "on_failure":
		return failed
	}
	return !failed
}

// Dependency is an earlier job whose artifacts this one downloads.
type Dependency struct {
	// ID is the dependency's job ID (--id).
	ID int64
	// Name is its job name.
	Name string
	// Token is what the runner passes as --token; "" means the job's own
	// token (what GitLab sends).
	Token string
}

// TokenFor is the token the runner passes for this dependency of a job
// whose token is job.
func (d Dependency) TokenFor(job string) string {
	if d.Token == "" {
		return job
	}
	return d.Token
}

// Context is what the stage scripts need from the running job.
type Context struct {
	// Vars are the job's variables in the runner's order (GetAllVariables);
	// every script exports them.
	Vars []Variable
	// BuildsDir, CacheDir and ProjectDir are the runner's (the project dir
	// is <builds_dir>/<project path> unless the builds dir is shared).
	BuildsDir, CacheDir, ProjectDir string
	// ProjectPath is the project's full path (job_info.project_full_path).
	ProjectPath string
	// Hostname is config_exec's hostname ("" for none).
	Hostname string
	// GitStrategy is GIT_STRATEGY: none, empty, fetch or clone.
	GitStrategy string
	// RepoURL is git_info.repo_url as GitLab sends it: with the job token.
	RepoURL string
	// Sha and Ref are the commit and ref get_sources checks out.
	Sha, Ref string
	// Refspecs are git_info.refspecs.
	Refspecs []string
	// Steps are the job's steps (script, after_script, ...).
	Steps []Step
	// JobID is the job's id; Token its job token.
	JobID int64
	Token string
	// ServerURL is the GitLab URL the helpers talk to (CI_SERVER_URL).
	ServerURL string
	// Cache, Artifacts and Dependencies drive the cache and artifact
	// stages; nil or empty skips them.
	Cache        *Cache
	Artifacts    *Artifacts
	Dependencies []Dependency
}

// RunnerVersion is the gitlab-runner version whose scripts this package
// writes (its user agent in git fetch, CI_RUNNER_VERSION of local jobs).
const RunnerVersion = "19.4.0"
