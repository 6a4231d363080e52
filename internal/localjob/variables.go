package localjob

import (
	"encoding/json"
	"os"
	"path"
	"runtime"
	"strconv"
	"strings"

	"github.com/ci-exec/ci-exec/internal/jobscript"
)

// variables is the job's variable list in the runner's order
// (GetAllVariables): runner variables, GitLab's predefined ones, the
// file's (global, then the job's), --var/--env-file, the trailing runner
// ones; then expanded as the runner expands them ($VAR and ${VAR} from the
// list itself, last value wins; expand: false values as written).
func (r *run) variables() []jobscript.Variable {
	pub := func(k, v string) jobscript.Variable { return jobscript.Variable{Key: k, Value: v, Public: true} }
	var vars []jobscript.Variable
	img := r.image()
	if img != "" {
		vars = append(vars, pub("CI_JOB_IMAGE", img))
	}
	vars = append(vars, pub("CI_RUNNER_SHORT_TOKEN", RunnerShortToken))
	vars = append(vars,
		pub("CI_BUILDS_DIR", r.builds),
		pub("CI_PROJECT_DIR", r.project),
		pub("CI_CONCURRENT_ID", strconv.Itoa(r.concurrentID())),
		pub("CI_CONCURRENT_PROJECT_ID", strconv.Itoa(r.concurrentID())),
		pub("CI_SERVER", "yes"),
		pub("CI_JOB_STATUS", r.status),
		pub("CI_JOB_TIMEOUT", strconv.Itoa(int(r.timeout().Seconds()))),
	)
	vars = append(vars, r.predefined()...)
	raw := map[string]bool{}
	for _, v := range r.job.Variables {
		vars = append(vars, jobscript.Variable{Key: v.Key, Value: v.Value, Raw: v.Raw})
		raw[v.Key] = v.Raw
	}
	for _, v := range r.opt.Vars {
		vars = append(vars, jobscript.Variable{Key: v.Key, Value: v.Value, Raw: v.Raw})
	}
	vars = append(vars,
		pub("CI_SHARED_ENVIRONMENT", "true"),
		pub("CI_RUNNER_VERSION", jobscript.RunnerVersion),
		pub("CI_RUNNER_REVISION", "ci-exec-exec"),
		pub("CI_RUNNER_EXECUTABLE_ARCH", runtime.GOOS+"/"+runtime.GOARCH),
	)
	if r.project != "" {
		vars = append(vars, pub("RUNNER_TEMP_PROJECT_DIR", r.project+".tmp"))
	}
	return expand(vars)
}

// expand is the runner's JobVariables.Expand.
func expand(vars []jobscript.Variable) []jobscript.Variable {
	lookup := func(k string) string {
		val := ""
		for _, v := range vars {
			if v.Key == k {
				val = v.Value
			}
		}
		return val
	}
	out := make([]jobscript.Variable, len(vars))
	for i, v := range vars {
		if !v.Raw {
			v.Value = os.Expand(v.Value, lookup)
		}
		out[i] = v
	}
	return out
}

// image is the job's image with variables expanded, as the runner
// expands image: names.
func (r *run) image() string {
	name := r.job.Image.Name
	if !strings.Contains(name, "$") {
		return name
	}
	var vars []jobscript.Variable
	for _, v := range r.job.Variables {
		vars = append(vars, jobscript.Variable{Key: v.Key, Value: v.Value, Raw: v.Raw})
	}
	for _, v := range r.opt.Vars {
		vars = append(vars, jobscript.Variable{Key: v.Key, Value: v.Value})
	}
	return os.Expand(name, func(k string) string {
		val := ""
		for _, v := range expand(vars) {
			if v.Key == k {
				val = v.Value
			}
		}
		return val
	})
}

// concurrentID keeps two local jobs of one user that run at the same time
// out of each other's builds dir (<data_dir>/builds/local/<NNN>).
func (r *run) concurrentID() int { return os.Getpid() % 100000 }

// predefined are GitLab's predefined variables for a local job: what a
// pipeline would set, from the tree and git where there is one.
func (r *run) predefined() []jobscript.Variable {
	pub := func(k, v string) jobscript.Variable { return jobscript.Variable{Key: k, Value: v, Public: true} }
	id := strconv.FormatInt(r.jobID, 10)
	p := r.opt.ProjectPath
	vars := []jobscript.Variable{
		pub("CI", "true"),
		pub("GITLAB_CI", "true"),
		pub("CI_PIPELINE_ID", id),
		pub("CI_PIPELINE_SOURCE", "local"),
		pub("CI_JOB_ID", id),
		pub("CI_JOB_NAME", r.job.Name),
		pub("CI_JOB_NAME_SLUG", slug(r.job.Name)),
		pub("CI_JOB_STAGE", r.job.Stage),
		{Key: "CI_JOB_TOKEN", Value: r.token, Masked: true},
		pub("CI_PROJECT_ID", "0"),
		pub("CI_PROJECT_NAME", path.Base(p)),
		pub("CI_PROJECT_PATH", p),
		pub("CI_PROJECT_PATH_SLUG", slug(p)),
		pub("CI_PROJECT_NAMESPACE", path.Dir(p)),
		pub("GITLAB_USER_LOGIN", currentUser()),
		pub("GIT_STRATEGY", "none"),
	}
	if g := r.opt.Git; g.Sha != "" {
		vars = append(vars, pub("CI_COMMIT_SHA", g.Sha), pub("CI_COMMIT_SHORT_SHA", g.Sha[:min(8, len(g.Sha))]))
	}
	if g := r.opt.Git; g.Ref != "" {
		vars = append(vars, pub("CI_COMMIT_REF_NAME", g.Ref), pub("CI_COMMIT_REF_SLUG", slug(g.Ref)))
		if g.Branch {
			vars = append(vars, pub("CI_COMMIT_BRANCH", g.Ref))
		}
	}
	if len(r.job.MatrixVars) > 0 {
		vars = append(vars, pub("CI_NODE_INDEX", "1"), pub("CI_NODE_TOTAL", "1"))
	}
	return vars
}

// slug is GitLab's *_SLUG: lower case, [a-z0-9] kept, others -, at most
// 63 bytes, no - at either end.
func slug(s string) string {
	var b strings.Builder
	for _, c := range strings.ToLower(s) {
		if c >= 'a' && c <= 'z' || c >= '0' && c <= '9' {
			b.WriteRune(c)
		} else {
			b.WriteByte('-')
		}
	}
	out := b.String()
	if len(out) > 63 {
		out = out[:63]
	}
	return strings.Trim(out, "-")
}

func currentUser() string {
	if u := os.Getenv("USER"); u != "" {
		return u
	}
	return strconv.Itoa(os.Getuid())
}

// response is the part of the job payload (JOB_RESPONSE_FILE) ci-exec
// reads, in the runner's shape.
type response struct {
	ID      int64  `json:"id"`
	Token   string `json:"token"`
	JobInfo struct {
		Name            string `json:"name"`
		Stage           string `json:"stage"`
		ProjectID       int64  `json:"project_id"`
		ProjectName     string `json:"project_name"`
		ProjectFullPath string `json:"project_full_path"`
	} `json:"job_info"`
	GitInfo struct {
		Sha string `json:"sha"`
		Ref string `json:"ref"`
	} `json:"git_info"`
	RunnerInfo struct {
		Timeout int `json:"timeout"`
	} `json:"runner_info"`
	Variables []jobscript.Variable `json:"variables"`
	Steps     []responseStep       `json:"steps"`
	Image     struct {
		Name       string   `json:"name"`
		Entrypoint []string `json:"entrypoint,omitempty"`
	} `json:"image"`
	Services     []any `json:"services"`
	Dependencies []any `json:"dependencies"`
}

type responseStep struct {
	Name         string   `json:"name"`
	Script       []string `json:"script"`
	Timeout      int      `json:"timeout"`
	When         string   `json:"when"`
	AllowFailure bool     `json:"allow_failure"`
}

// writeResponse writes JOB_RESPONSE_FILE (0600: it holds the job token).
func (r *run) writeResponse() error {
	var p response
	p.ID = r.jobID
	p.Token = r.token
	p.JobInfo.Name = r.job.Name
	p.JobInfo.Stage = r.job.Stage
	p.JobInfo.ProjectName = path.Base(r.opt.ProjectPath)
	p.JobInfo.ProjectFullPath = r.opt.ProjectPath
	p.GitInfo.Sha, p.GitInfo.Ref = r.opt.Git.Sha, r.opt.Git.Ref
	tmo := int(r.timeout().Seconds())
	p.RunnerInfo.Timeout = tmo
	// Only GitLab's own variables are in the payload's trusted list; the
	// rest travel as CUSTOM_ENV_ like any user variable.
	p.Variables = r.predefined()
	p.Image.Name = r.image()
	p.Image.Entrypoint = r.job.Image.Entrypoint
	p.Services, p.Dependencies = []any{}, []any{}
	for _, s := range r.steps() {
		st := responseStep{Name: s.Name, Script: s.Script, Timeout: tmo, When: "on_success"}
		if s.Name == "after_script" {
			st.When, st.Timeout = "always", 300
		}
		p.Steps = append(p.Steps, st)
	}
	b, err := json.Marshal(p)
	if err != nil {
		return err
	}
	return os.WriteFile(r.respF, append(b, '\n'), 0o600)
}
