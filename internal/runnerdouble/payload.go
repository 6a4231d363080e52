package runnerdouble

import (
	"github.com/ci-exec/ci-exec/internal/jobscript"

	"encoding/json"
	"net/url"
	"path"
	"sort"
	"strconv"
	"strings"
)

// Variable is one job variable as in the payload's "variables" array.
type Variable = jobscript.Variable

type payloadJobInfo struct {
	Name            string `json:"name"`
	Stage           string `json:"stage"`
	ProjectID       int64  `json:"project_id"`
	ProjectName     string `json:"project_name"`
	ProjectFullPath string `json:"project_full_path"`
	PipelineID      int64  `json:"pipeline_id"`
}

type payloadGitInfo struct {
	RepoURL   string   `json:"repo_url"`
	Ref       string   `json:"ref"`
	Sha       string   `json:"sha"`
	BeforeSha string   `json:"before_sha"`
	RefType   string   `json:"ref_type"`
	Refspecs  []string `json:"refspecs"`
	Depth     int      `json:"depth"`
}

type payloadRunnerInfo struct {
	Timeout int `json:"timeout"`
}

type payloadStep struct {
	Name         string   `json:"name"`
	Script       []string `json:"script"`
	Timeout      int      `json:"timeout"`
	When         string   `json:"when"`
	AllowFailure bool     `json:"allow_failure"`
}

type payloadImage struct {
	Name string `json:"name"`
}

type payloadFeatures struct {
	TraceSections  bool     `json:"trace_sections"`
	FailureReasons []string `json:"failure_reasons"`
}

type payload struct {
	ID            int64             `json:"id"`
	Token         string            `json:"token"`
	AllowGitFetch bool              `json:"allow_git_fetch"`
	JobInfo       payloadJobInfo    `json:"job_info"`
	GitInfo       payloadGitInfo    `json:"git_info"`
	RunnerInfo    payloadRunnerInfo `json:"runner_info"`
	Variables     []Variable        `json:"variables"`
	Steps         []payloadStep     `json:"steps"`
	Image         payloadImage      `json:"image"`
	Services      []any             `json:"services"`
	Artifacts     []any             `json:"artifacts"`
	Cache         []any             `json:"cache"`
	Credentials   []any             `json:"credentials"`
	Dependencies  []any             `json:"dependencies"`
	Features      payloadFeatures   `json:"features"`
}

const fakeSHA = "1111111111111111111111111111111111111111"

// featureFlags is a small, fixed subset of the runner's FF_* variables
// (default false unless in featureFlagDefaults, as in gitlab-runner 19.4);
// job variables with these names override the value.
var featureFlags = []string{
	"FF_USE_GIT_BUNDLE_URIS",
	"FF_USE_GITALY_CORRELATION_ID",
	"FF_NETWORK_PER_BUILD",
	"FF_USE_LEGACY_BASH_EVAL",
	"FF_ENABLE_BASH_EXIT_CODE_CHECK",
	"FF_SCRIPT_SECTIONS",
	"FF_ENABLE_JOB_CLEANUP",
	"FF_POSIXLY_CORRECT_ESCAPES",
	"FF_GIT_URLS_WITHOUT_TOKENS",
	"FF_USE_JOB_ROUTER",
}

// featureFlagDefaults are the flags of featureFlags that 19.4 turns on by
// default (helpers/featureflags/flags.go).
var featureFlagDefaults = map[string]bool{"FF_USE_GIT_BUNDLE_URIS": true, "FF_USE_GITALY_CORRELATION_ID": true}

func isFeatureFlag(key string) bool {
	for _, f := range featureFlags {
		if f == key {
			return true
		}
	}
	return false
}

func whenOr(when string) string {
	if when == "" {
		return "on_success"
	}
	return when
}

func timeoutSeconds(j Job) int {
	s := int(j.Timeout.Seconds())
	if s < 1 {
		s = 1
	}
	return s
}

func projectName(full string) string {
	return path.Base(full)
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// PayloadVariables returns the job's payload "variables" (defaults applied):
// GitLab's predefined variables (CI_JOB_ID, CI_JOB_TOKEN masked, CI_SERVER_URL,
// CI_PROJECT_PATH, CI_REGISTRY*, ...), GIT_STRATEGY, then Variables and
// MaskedVariables in key order.
func (j Job) PayloadVariables() []Variable {
	j = j.withDefaults()
	pub := func(k, v string) Variable { return Variable{Key: k, Value: v, Public: true} }
	id := strconv.FormatInt(j.ID, 10)
	ns := path.Dir(j.ProjectFullPath)
	vars := []Variable{
		pub("CI_PIPELINE_ID", "1"),
		pub("CI_PIPELINE_SOURCE", "push"),
		pub("CI_JOB_ID", id),
		pub("CI_JOB_NAME", j.Name),
		pub("CI_JOB_STAGE", "test"),
		pub("CI_JOB_URL", ServerURL+"/"+j.ProjectFullPath+"/-/jobs/"+id),
		{Key: "CI_JOB_TOKEN", Value: j.Token, Masked: true},
		pub("CI_SERVER_URL", ServerURL),
		pub("CI_SERVER_HOST", "127.0.0.1"),
		pub("CI_API_V4_URL", ServerURL+"/api/v4"),
		pub("CI_PROJECT_ID", "1"),
		pub("CI_PROJECT_NAME", projectName(j.ProjectFullPath)),
		pub("CI_PROJECT_PATH", j.ProjectFullPath),
		pub("CI_PROJECT_NAMESPACE", ns),
		pub("CI_PROJECT_URL", ServerURL+"/"+j.ProjectFullPath),
		pub("CI_COMMIT_SHA", j.Sha),
		pub("CI_COMMIT_REF_NAME", "main"),
		pub("CI_COMMIT_BRANCH", "main"),
		pub("GITLAB_USER_LOGIN", "root"),
		pub("CI_REPOSITORY_URL", j.repoURL()),
	}
	if j.Registry != "" {
		vars = append(vars,
			pub("CI_REGISTRY", j.Registry),
			pub("CI_REGISTRY_IMAGE", j.Registry+"/"+strings.ToLower(j.ProjectFullPath)),
			pub("CI_REGISTRY_USER", "gitlab-ci-token"),
			Variable{Key: "CI_REGISTRY_PASSWORD", Value: j.Token, Masked: true},
		)
	}
	vars = append(vars, pub("GIT_STRATEGY", j.GitStrategy))
	for _, k := range sortedKeys(j.Variables) {
		vars = append(vars, Variable{Key: k, Value: j.Variables[k]})
	}
	for _, k := range sortedKeys(j.MaskedVariables) {
		vars = append(vars, Variable{Key: k, Value: j.MaskedVariables[k], Masked: true})
	}
	return vars
}

// repoURL is git_info.repo_url and CI_REPOSITORY_URL as GitLab sends
// them: an http(s) URL with gitlab-ci-token and the job token in it.
func (j Job) repoURL() string {
	u := j.RepoURL
	if u == "" {
		u = ServerURL + "/" + j.ProjectFullPath + ".git"
	}
	return withJobToken(u, j.Token)
}

// refspecs are git_info.refspecs: what GitLab sends for a branch pipeline.
func (j Job) refspecs() []string {
	if j.Refspecs != nil {
		return j.Refspecs
	}
	return []string{"+refs/heads/main:refs/remotes/origin/main"}
}

// ResponseJSON returns the JOB_RESPONSE_FILE content the double writes for
// this job (the §5.2 payload shape, defaults applied).
func (j Job) ResponseJSON() ([]byte, error) {
	j = j.withDefaults()
	tmo := timeoutSeconds(j)
	p := payload{
		ID:    j.ID,
		Token: j.Token,
		JobInfo: payloadJobInfo{
			Name:            j.Name,
			Stage:           "test",
			ProjectID:       1,
			ProjectName:     projectName(j.ProjectFullPath),
			ProjectFullPath: j.ProjectFullPath,
			PipelineID:      1,
		},
		GitInfo: payloadGitInfo{
			RepoURL:   j.repoURL(),
			Ref:       "main",
			Sha:       j.Sha,
			BeforeSha: "0000000000000000000000000000000000000000",
			RefType:   "branch",
			Refspecs:  j.refspecs(),
			Depth:     0,
		},
		RunnerInfo:   payloadRunnerInfo{Timeout: tmo},
		Variables:    j.PayloadVariables(),
		Image:        payloadImage{Name: j.Image},
		Services:     j.payloadServices(),
		Artifacts:    []any{},
		Cache:        []any{},
		Credentials:  []any{},
		Dependencies: []any{},
		Features:     payloadFeatures{FailureReasons: []string{}},
	}
	if a := j.Artifacts; a != nil {
		p.Artifacts = append(p.Artifacts, map[string]any{"name": a.Name, "untracked": false, "paths": a.Paths,
			"when": whenOr(a.When), "artifact_type": "archive", "artifact_format": "zip", "expire_in": a.ExpireIn})
	}
	if c := j.Cache; c != nil {
		p.Cache = append(p.Cache, map[string]any{"key": c.KeyOrDefault(), "untracked": false, "policy": "pull-push",
			"paths": c.Paths, "when": whenOr(c.When)})
	}
	for _, d := range j.Dependencies {
		p.Dependencies = append(p.Dependencies, map[string]any{"id": d.ID, "name": d.Name, "token": d.TokenFor(j.Token),
			"artifacts_file": map[string]any{"filename": "artifacts.zip", "size": 1}})
	}
	for _, s := range j.steps() {
		st := payloadStep{Name: s.Name, Script: s.Script, Timeout: tmo, When: "on_success"}
		if st.Script == nil {
			st.Script = []string{}
		}
		if s.Name == "after_script" {
			st.When = "always"
			st.Timeout = int(DefaultAfterScriptTimeout.Seconds())
		}
		p.Steps = append(p.Steps, st)
	}
	b, err := json.Marshal(p)
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// withJobToken is the repo_url GitLab sends: an http(s) URL carries
// gitlab-ci-token and the job token.
func withJobToken(repoURL, token string) string {
	u, err := url.Parse(repoURL)
	if err != nil || u.User != nil || u.Scheme != "http" && u.Scheme != "https" {
		return repoURL
	}
	u.User = url.UserPassword("gitlab-ci-token", token)
	return u.String()
}

// payloadServices is the payload's "services" (common/spec Image).
func (j Job) payloadServices() []any {
	out := []any{}
	for _, s := range j.Services {
		m := map[string]any{"name": s.Name}
		if s.Alias != "" {
			m["alias"] = s.Alias
		}
		if len(s.Entrypoint) > 0 {
			m["entrypoint"] = s.Entrypoint
		}
		if len(s.Command) > 0 {
			m["command"] = s.Command
		}
		var vars []Variable
		for _, k := range sortedKeys(s.Variables) {
			vars = append(vars, Variable{Key: k, Value: s.Variables[k]})
		}
		if len(vars) > 0 {
			m["variables"] = vars
		}
		var ports []map[string]any
		for _, p := range s.Ports {
			ports = append(ports, map[string]any{"number": p})
		}
		if len(ports) > 0 {
			m["ports"] = ports
		}
		out = append(out, m)
	}
	return out
}

// servicesEnv is CUSTOM_ENV_CI_JOB_SERVICES's value, as the runner's
// getCIJobServicesEnv marshals it ("" for a job without services).
func (j Job) servicesEnv() string {
	if len(j.Services) == 0 {
		return ""
	}
	type jsonService struct {
		Name       string            `json:"name"`
		Alias      string            `json:"alias"`
		Entrypoint []string          `json:"entrypoint"`
		Command    []string          `json:"command"`
		Variables  map[string]string `json:"variables,omitempty"`
	}
	var out []jsonService
	for _, s := range j.Services {
		out = append(out, jsonService{Name: s.Name, Alias: s.Alias, Entrypoint: s.Entrypoint, Command: s.Command, Variables: s.Variables})
	}
	b, _ := json.Marshal(out)
	return string(b)
}
