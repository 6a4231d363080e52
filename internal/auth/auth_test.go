package auth

import (
	"fmt"
	"strings"
	"testing"

	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/job"
)

var chNames = VariableNames{Username: "CH_IMAGE_USERNAME", Password: "CH_IMAGE_PASSWORD"}

const token = "glcbt-secret-job-token"

// newJob builds a job whose trusted payload lists CI_REGISTRY (when not "")
// and whose user-controlled variables are vars.
func newJob(trustedRegistry string, vars map[string]string) *job.Job {
	j := &job.Job{Vars: map[string]string{}, Response: &job.Response{Token: token}}
	if trustedRegistry != "" {
		j.Response.Variables = append(j.Response.Variables, job.Variable{Key: "CI_REGISTRY", Value: trustedRegistry, Public: true})
	}
	for k, v := range vars {
		j.Vars[k] = v
	}
	return j
}

func TestChoose(t *testing.T) {
	tests := map[string]struct {
		job      *job.Job
		registry string
		want     Source
		wantUser string
		wantPass string
	}{
		"job token for exactly CI_REGISTRY": {
			job: newJob("127.0.0.1:5443", nil), registry: "127.0.0.1:5443",
			want: JobToken, wantUser: JobTokenUser, wantPass: token,
		},
		"host names compare case-insensitively": {
			job: newJob("Registry.Example.com:5050", nil), registry: "registry.example.com:5050",
			want: JobToken, wantUser: JobTokenUser, wantPass: token,
		},
		"port that only starts like CI_REGISTRY's": {
			job: newJob("127.0.0.1:5443", nil), registry: "127.0.0.1:54430",
		},
		"CI_REGISTRY port that only starts like the image's": {
			job: newJob("127.0.0.1:54430", nil), registry: "127.0.0.1:5443",
		},
		"localhost is not 127.0.0.1": {
			job: newJob("127.0.0.1:5443", nil), registry: "localhost:5443",
		},
		"no default port is assumed": {
			job: newJob("registry.example.com", nil), registry: "registry.example.com:443",
		},
		"suffix trick": {
			job: newJob("127.0.0.1:5443", nil), registry: "127.0.0.1:5443.evil.com",
		},
		"docker hub image, GitLab registry": {
			job: newJob("registry.example.com", nil), registry: "docker.io",
		},
		"no CI_REGISTRY at all": {
			job: newJob("", nil), registry: "127.0.0.1:5443",
		},
		"user-overridden CI_REGISTRY does not redirect the token": {
			job:      newJob("127.0.0.1:5443", map[string]string{"CI_REGISTRY": "evil.example.com"}),
			registry: "evil.example.com",
		},
		"user-overridden CI_REGISTRY does not stop the token for the real one": {
			job:      newJob("127.0.0.1:5443", map[string]string{"CI_REGISTRY": "evil.example.com"}),
			registry: "127.0.0.1:5443", want: JobToken, wantUser: JobTokenUser, wantPass: token,
		},
		"user variables win over the job token": {
			job:      newJob("127.0.0.1:5443", map[string]string{"CH_IMAGE_USERNAME": "alice", "CH_IMAGE_PASSWORD": "pw-of-alice"}),
			registry: "127.0.0.1:5443", want: UserVariables, wantUser: "alice", wantPass: "pw-of-alice",
		},
		"user variables for any registry": {
			job:      newJob("127.0.0.1:5443", map[string]string{"CH_IMAGE_USERNAME": "alice", "CH_IMAGE_PASSWORD": "pw-of-alice"}),
			registry: "docker.io", want: UserVariables, wantUser: "alice", wantPass: "pw-of-alice",
		},
		"a user-set CI_JOB_TOKEN is not the job token": {
			job:      newJob("", map[string]string{"CI_JOB_TOKEN": "forged", "CI_REGISTRY": "127.0.0.1:5443"}),
			registry: "127.0.0.1:5443",
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			c, err := Choose(tc.job, tc.registry, chNames)
			if err != nil {
				t.Fatalf("Choose: %v", err)
			}
			if c.Source != tc.want || c.Username != tc.wantUser || c.Password() != tc.wantPass {
				t.Fatalf("got %v (password %q), want %v user %q password %q", c, c.Password(), tc.want, tc.wantUser, tc.wantPass)
			}
			if tc.want == Anonymous && c.Env(chNames) != nil {
				t.Fatalf("anonymous credential has an environment: %v", c.Env(chNames))
			}
		})
	}
}

func TestChooseWithoutPayload(t *testing.T) {
	// A job without JOB_RESPONSE_FILE has no trusted token: never take one
	// from the user-controlled variables.
	j := &job.Job{Vars: map[string]string{"CI_JOB_TOKEN": "forged-token", "CI_REGISTRY": "127.0.0.1:5443"}}
	c, err := Choose(j, "127.0.0.1:5443", chNames)
	if err != nil || !c.Anonymous() {
		t.Fatalf("got %v, %v; want anonymous", c, err)
	}
}

func TestChooseHalfCredential(t *testing.T) {
	for _, vars := range []map[string]string{
		{"CH_IMAGE_USERNAME": "alice"},
		{"CH_IMAGE_PASSWORD": "pw-of-alice"},
		{"CH_IMAGE_USERNAME": "alice", "CH_IMAGE_PASSWORD": ""},
	} {
		_, err := Choose(newJob("127.0.0.1:5443", vars), "127.0.0.1:5443", chNames)
		if err == nil || failure.ClassOf(err) != failure.User {
			t.Fatalf("%v: got %v, want a user error", vars, err)
		}
		if !strings.Contains(err.Error(), "set both CH_IMAGE_USERNAME and CH_IMAGE_PASSWORD") {
			t.Fatalf("message does not say what to do: %v", err)
		}
		if strings.Contains(err.Error(), "pw-of-alice") {
			t.Fatalf("message leaks the password: %v", err)
		}
	}
}

func TestCredentialNeverFormatsPassword(t *testing.T) {
	c, err := Choose(newJob("127.0.0.1:5443", nil), "127.0.0.1:5443", chNames)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{c.String(), fmt.Sprint(c), fmt.Sprintf("%v %+v %#v %s", c, c, c, c)} {
		if strings.Contains(s, token) {
			t.Fatalf("formatted credential leaks the token: %s", s)
		}
	}
	if got := c.String(); got != "job token (user gitlab-ci-token) for 127.0.0.1:5443" {
		t.Fatalf("String() = %q", got)
	}
	env := c.Env(VariableNames{Username: "APPTAINER_DOCKER_USERNAME", Password: "APPTAINER_DOCKER_PASSWORD"})
	want := []string{"APPTAINER_DOCKER_USERNAME=gitlab-ci-token", "APPTAINER_DOCKER_PASSWORD=" + token}
	if strings.Join(env, "\n") != strings.Join(want, "\n") {
		t.Fatalf("Env = %v, want %v", env, want)
	}
}
