// Package job is the job as ci-exec sees it: the runner's contract variables,
// the job's CUSTOM_ENV_ variables (which users can override), and the trusted
// JOB_RESPONSE_FILE (which they cannot).
//
// Anything security-relevant (the job token, the registry the token may be
// sent to, the job id used in paths) is read from the response file, never
// from CUSTOM_ENV_ variables, because a user can set a CI/CD variable named
// CI_REGISTRY or CI_JOB_TOKEN and the runner would pass it along.
package job

import (
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"

	"gitlab.com/gitlab-org/gitlab-runner/executors/custom/api"
)

// CustomEnvPrefix prefixes every job variable in the driver's environment.
const CustomEnvPrefix = "CUSTOM_ENV_"

// Job is one job's view for one stage call.
type Job struct {
	// Vars are the job's variables with CUSTOM_ENV_ stripped. User-controlled.
	Vars map[string]string
	// Host is the driver's own environment without the CUSTOM_ENV_ entries:
	// the runner's environment, the contract variables and job_env.
	Host map[string]string
	// Response is the trusted job payload (nil if the runner gave none).
	Response *Response

	// BuildFailureCode and SystemFailureCode are the runner's exit codes.
	BuildFailureCode  int
	SystemFailureCode int
	// ExitCodeFile is where a script's exit code goes (may be empty).
	ExitCodeFile string
}

// Response is the part of the runner's job payload ci-exec uses. Unknown
// fields are ignored; the runner's own type (common/spec) cannot be imported.
type Response struct {
	ID      int64  `json:"id"`
	Token   string `json:"token"`
	JobInfo struct {
		Name            string `json:"name"`
		Stage           string `json:"stage"`
		ProjectID       int64  `json:"project_id"`
		ProjectName     string `json:"project_name"`
		ProjectFullPath string `json:"project_full_path"`
	} `json:"job_info"`
	RunnerInfo struct {
		Timeout int `json:"timeout"`
	} `json:"runner_info"`
	Variables []Variable `json:"variables"`
	Image     struct {
		Name string `json:"name"`
	} `json:"image"`
	// Services are the job's `services:` as the payload has them: only
	// their ports are read here (the rest comes in CI_JOB_SERVICES).
	Services []struct {
		Ports []struct {
			Number int `json:"number"`
		} `json:"ports"`
	} `json:"services"`
	// Dependencies are the jobs whose artifacts this one downloads; the
	// runner passes each one's token to its artifacts-downloader.
	Dependencies []Dependency `json:"dependencies"`
}

// Dependency is one payload dependency (only what ci-exec needs).
type Dependency struct {
	ID    int64  `json:"id"`
	Token string `json:"token"`
}

// Variable is one payload variable.
type Variable struct {
	Key    string `json:"key"`
	Value  string `json:"value"`
	Public bool   `json:"public"`
	Masked bool   `json:"masked"`
	File   bool   `json:"file"`
}

// FromEnviron builds the job from a process environment (os.Environ()).
func FromEnviron(environ []string) (*Job, error) {
	j := &Job{Vars: map[string]string{}, Host: map[string]string{}}
	for _, kv := range environ {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			continue
		}
		if name, isJob := strings.CutPrefix(k, CustomEnvPrefix); isJob {
			j.Vars[name] = v
		} else {
			j.Host[k] = v
		}
	}
	var err error
	if j.BuildFailureCode, err = codeFromEnv(j.Host, api.BuildFailureExitCodeVariable, 1); err != nil {
		return j, err
	}
	if j.SystemFailureCode, err = codeFromEnv(j.Host, api.SystemFailureExitCodeVariable, 2); err != nil {
		return j, err
	}
	j.ExitCodeFile = j.Host[api.BuildCodeFileVariable]
	if path := j.Host[api.JobResponseFileVariable]; path != "" {
		r, err := ReadResponse(path)
		if err != nil {
			return j, err
		}
		j.Response = r
	}
	return j, nil
}

// codeFromEnv reads an exit code the runner defines. The runner documents
// that drivers must not hard-code these, so a missing value falls back to the
// runner's current default and a malformed one is an error.
func codeFromEnv(env map[string]string, key string, def int) (int, error) {
	v, ok := env[key]
	if !ok || v == "" {
		return def, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 || n > 255 {
		return def, fmt.Errorf("%s=%q is not an exit code", key, v)
	}
	return n, nil
}

// ReadResponse decodes the runner's JOB_RESPONSE_FILE.
func ReadResponse(path string) (*Response, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read job response: %w", err)
	}
	var r Response
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("decode job response %s: %w", path, err)
	}
	return &r, nil
}

// ID is the job id: the trusted one when available.
func (j *Job) ID() int64 {
	if j.Response != nil && j.Response.ID != 0 {
		return j.Response.ID
	}
	id, _ := strconv.ParseInt(j.Vars["CI_JOB_ID"], 10, 64)
	return id
}

// Token is the job token from the trusted payload ("" when unknown).
func (j *Job) Token() string {
	if j.Response != nil {
		return j.Response.Token
	}
	return ""
}

// TrustedVar returns a variable from the trusted payload. GitLab lists the
// predefined variables first, so the first occurrence is the server's value
// even if a user defined a variable of the same name later in the list.
func (j *Job) TrustedVar(key string) (string, bool) {
	if j.Response == nil {
		return "", false
	}
	for _, v := range j.Response.Variables {
		if v.Key == key {
			return v.Value, true
		}
	}
	return "", false
}

// Tokens are the credentials the runner writes into its helpers' command
// lines (--token): the job token and the dependencies' tokens, from the
// trusted payload. Without a payload only the CI_JOB_TOKEN variable is
// known.
func (j *Job) Tokens() []string {
	if j.Response == nil {
		if t := j.Vars["CI_JOB_TOKEN"]; t != "" {
			return []string{t}
		}
		return nil
	}
	var out []string
	if t := j.Response.Token; t != "" {
		out = append(out, t)
	}
	for _, d := range j.Response.Dependencies {
		if d.Token != "" && d.Token != j.Response.Token {
			out = append(out, d.Token)
		}
	}
	return out
}

// Secrets lists values that must never appear in a log or an argv: the job
// token, the dependencies' tokens and every masked or non-public payload
// variable long enough to be recognised.
func (j *Job) Secrets() []string {
	var out []string
	if t := j.Token(); t != "" {
		out = append(out, t)
	}
	if j.Response != nil {
		for _, d := range j.Response.Dependencies {
			if d.Token != "" && d.Token != j.Response.Token {
				out = append(out, d.Token)
			}
		}
		for _, v := range j.Response.Variables {
			if (v.Masked || !v.Public) && len(v.Value) >= 8 {
				out = append(out, v.Value)
			}
		}
	}
	if t := j.Vars["CI_JOB_TOKEN"]; len(t) >= 8 {
		out = append(out, t)
	}
	return out
}

// Image is the job's image name ("" when the job has none).
func (j *Job) Image() string {
	if v := j.Vars["CI_JOB_IMAGE"]; v != "" {
		return v
	}
	if j.Response != nil {
		return j.Response.Image.Name
	}
	return ""
}

// ServicePorts are the payload's ports of each service, in order.
func (j *Job) ServicePorts() [][]int {
	if j.Response == nil {
		return nil
	}
	out := make([][]int, len(j.Response.Services))
	for i, s := range j.Response.Services {
		for _, p := range s.Ports {
			if p.Number > 0 && p.Number < 65536 {
				out[i] = append(out[i], p.Number)
			}
		}
	}
	return out
}
