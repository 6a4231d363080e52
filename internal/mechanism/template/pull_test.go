package template

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/joblog"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/mechanism/mechtest"
	"github.com/ci-exec/ci-exec/internal/policy"
)

// fakeTool is the program of the test templates: it records each call's
// words (one per line, a blank line after the call) in REC/calls and its
// environment in REC/env.<verb>, then acts on its verb: "pull" writes the
// file after --out= (or fails with the code in REC/pull-fails), "check"
// succeeds when REC/have exists; "auth" copies the file it is given to
// REC/authfile with its mode; a pull makes REC/have.
const fakeTool = `#!/bin/sh
rec=@REC@
for w in "$@"; do printf '%s\n' "$w"; done >> "$rec/calls"
echo >> "$rec/calls"
env > "$rec/env.$1"
case "$1" in
pull)
  for w in "$@"; do
    case "$w" in
    --out=*) echo image > "${w#--out=}" ;;
    --auth=*) cp "${w#--auth=}" "$rec/authfile"; stat -c %a "${w#--auth=}" > "$rec/authmode" ;;
    esac
  done
  if [ -e "$rec/pull-fails" ]; then echo "Error: manifest unknown" >&2; exit 1; fi
  : > "$rec/have" ;;
check) [ -e "$rec/have" ]; exit $? ;;
esac
exit 0
`

type fixture struct {
	rec, app, jobs, images string
}

func newFixture(t *testing.T) fixture {
	base := t.TempDir()
	f := fixture{rec: filepath.Join(base, "rec"), app: filepath.Join(base, "app"), jobs: filepath.Join(base, "jobs"), images: filepath.Join(base, "images")}
	for _, d := range []string{f.rec, f.app, f.jobs, f.images} {
		require.NoError(t, os.Mkdir(d, 0o700))
	}
	require.NoError(t, os.WriteFile(filepath.Join(f.app, "rt"), []byte(strings.ReplaceAll(fakeTool, "@REC@", "'"+f.rec+"'")), 0o755))
	return f
}

func (f fixture) runtime(t *testing.T, table string) *Runtime {
	t.Helper()
	doc := "[general]\ndata_dir = \"/d/$USER\"\nrun_mechanism = \"template:t\"\n[runtimes.t]\n" +
		"application_path = " + quote(f.app) + "\nimage_storage_dir = " + quote(f.images) + "\n" + table
	u := config.UserInfo{Name: jobUser, Home: jobHome}
	cfg, err := config.Parse(doc, u)
	require.NoError(t, err)
	return New("t", cfg.Template(), *cfg.Mechanism(), u, nil, time.Second, os.Getuid())
}

func quote(s string) string { return "'" + s + "'" }

// calls are the recorded calls, each a list of words.
func (f fixture) calls(t *testing.T) [][]string {
	b, err := os.ReadFile(filepath.Join(f.rec, "calls"))
	if os.IsNotExist(err) {
		return nil
	}
	require.NoError(t, err)
	var out [][]string
	for _, c := range strings.Split(strings.TrimSuffix(string(b), "\n\n"), "\n\n") {
		out = append(out, strings.Split(c, "\n"))
	}
	return out
}

func (f fixture) request(t *testing.T, key string, cred auth.Credential, log *bytes.Buffer) mechanism.PullRequest {
	ref, err := policy.ParseImage("registry.example.org:5050/ci/tool@" + digest)
	require.NoError(t, err)
	return mechanism.PullRequest{Ref: ref, Policy: config.PullAlways, Credential: cred, JobKey: key, Dir: f.jobs, Log: joblog.New(log)}
}

// fileTemplate pulls an image file, sets up a per-job instance and gives
// the credential to the pull in its environment.
const fileTemplate = `disable_user_args = true
pull = ["rt", "pull", "--out={image_file}", "{registry}#{repository}@{digest}"]
setup = ["rt", "setup", "{job_key}", "{image}"]
run = ["rt", "run", "{binds}", "{env}", "--cd={workdir}", "{job_key}", "{command}"]
teardown = ["rt", "teardown", "{job_key}"]
bind = ["--bind={src}:{dst}"]
env_name = ["--env={name}"]
username_env = "RT_USER"
password_env = "RT_PASSWORD"
username_variable = "RT_REGISTRY_USER"
password_variable = "RT_REGISTRY_PASSWORD"
`

func TestFileTemplateLifecycle(t *testing.T) {
	f := newFixture(t)
	r := f.runtime(t, fileTemplate)
	creds := mechtest.Creds{Names: r.CredentialVariables(), User: "alice"}
	cred := creds.FromUser(t, "registry.example.org:5050", "pa55-word")
	var log bytes.Buffer
	img, err := r.Pull(context.Background(), f.request(t, "job-1", cred, &log))
	require.NoError(t, err, log.String())
	assert.Equal(t, FormatFile, img.Format)
	assert.Equal(t, "/bin/sh", img.Shell)
	require.FileExists(t, img.Handle)
	assert.True(t, strings.HasPrefix(img.Handle, f.images+"/"+jobUser+".ci-exec/template-t/entries/"), img.Handle)
	require.NoError(t, r.CheckImage(img, f.jobs))

	calls := f.calls(t)
	require.Len(t, calls, 2)
	assert.Equal(t, []string{"pull", "--out=" + calls[0][1][len("--out="):], "registry.example.org:5050#ci/tool@" + digest}, calls[0])
	assert.Equal(t, []string{"setup", "job-1", img.Handle}, calls[1], "setup gets the job's key and the stored image")
	for _, c := range calls {
		assert.NotContains(t, strings.Join(c, " "), "pa55-word", "no credential on argv")
	}
	env, err := os.ReadFile(filepath.Join(f.rec, "env.pull"))
	require.NoError(t, err)
	assert.Contains(t, string(env), "RT_USER=alice\n")
	assert.Contains(t, string(env), "RT_PASSWORD=pa55-word\n")
	setupEnv, err := os.ReadFile(filepath.Join(f.rec, "env.setup"))
	require.NoError(t, err)
	assert.NotContains(t, string(setupEnv), "pa55-word", "the credential only reaches the pull")

	// Another job of the user: no second pull, its own setup.
	img2, err := r.Pull(context.Background(), f.request(t, "job-2", cred, &log))
	require.NoError(t, err)
	assert.Equal(t, img.Handle, img2.Handle)
	assert.Len(t, f.calls(t), 3)
	assert.Equal(t, []string{"setup", "job-2", img.Handle}, f.calls(t)[2])

	spec := mechanism.RunSpec{Info: mechanism.Info{Programs: map[string]string{"rt": "/x/rt"}}, Image: img, Workdir: "/w",
		Env: []string{"HOME=" + jobHome}, Argv: []string{"/bin/sh", "script"}, Binds: []policy.Bind{policy.SamePath("/b")}}
	argv, _, err := r.Command(spec)
	require.NoError(t, err)
	assert.Equal(t, []string{"/x/rt", "run", "--bind=/b:/b", "--env=HOME", "--cd=/w", "job-1", "/bin/sh", "script"}, argv)

	// What the state file says is checked against the store.
	forged := img
	forged.Handle = filepath.Join(f.jobs, "planted.sqsh")
	assert.ErrorContains(t, r.CheckImage(forged, f.jobs), "is not the one the store has")
	forged = img
	forged.Format = FormatReference
	assert.ErrorContains(t, r.CheckImage(forged, f.jobs), "is not what template:t makes")

	require.NoError(t, r.Release(context.Background(), img, f.jobs))
	last := f.calls(t)[len(f.calls(t))-1]
	assert.Equal(t, []string{"teardown", "job-1"}, last, "cleanup tears the job's instance down")
	assert.NoFileExists(t, img.Lease, "the job's lease ends at cleanup")
}

// refTemplate pulls into the runtime's own storage with a per-job
// credential file, and checks stored records.
const refTemplate = `disable_user_args = true
check = ["rt", "check", "{image}"]
pull = ["rt", "pull", "{auth}", "{ref}"]
run = ["rt", "run", "{binds}", "{env}", "{workdir}", "{image}", "{command}"]
bind = ["--bind={src}:{dst}"]
env_name = ["--env={name}"]
auth = ["--auth={authfile}"]
username_variable = "RT_REGISTRY_USER"
password_variable = "RT_REGISTRY_PASSWORD"
`

func TestReferenceTemplateAuthFile(t *testing.T) {
	f := newFixture(t)
	r := f.runtime(t, refTemplate)
	creds := mechtest.Creds{Names: r.CredentialVariables(), User: "gitlab-ci-token"}
	cred := creds.JobToken(t, "registry.example.org:5050", "glcbt-secret")
	var log bytes.Buffer
	img, err := r.Pull(context.Background(), f.request(t, "job-1", cred, &log))
	require.NoError(t, err, log.String())
	assert.Equal(t, "registry.example.org:5050/ci/tool@"+digest, img.Handle)
	assert.Equal(t, FormatReference, img.Format)

	calls := f.calls(t)
	require.Len(t, calls, 2)
	assert.Equal(t, []string{"check", img.Handle}, calls[1], "what the pull made is checked before it is recorded")
	authPath := strings.TrimPrefix(calls[0][1], "--auth=")
	assert.Equal(t, []string{"pull", "--auth=" + authPath, "registry.example.org:5050/ci/tool@" + digest}, calls[0])
	assert.Equal(t, f.jobs, filepath.Dir(authPath), "the credential file is in the job's state dir")
	assert.NoFileExists(t, authPath, "and removed as soon as the pull ends")
	mode, err := os.ReadFile(filepath.Join(f.rec, "authmode"))
	require.NoError(t, err)
	assert.Equal(t, "600\n", string(mode))
	b, err := os.ReadFile(filepath.Join(f.rec, "authfile"))
	require.NoError(t, err)
	assert.Contains(t, string(b), `"registry.example.org:5050"`)
	assert.NotContains(t, strings.Join(calls[0], " "), "glcbt-secret")

	// A stored record is used only while check says the runtime has it.
	_, err = r.Pull(context.Background(), f.request(t, "job-2", cred, &log))
	require.NoError(t, err)
	require.Len(t, f.calls(t), 3, "no second pull")
	assert.Equal(t, []string{"check", img.Handle}, f.calls(t)[2])
	require.NoError(t, os.Remove(filepath.Join(f.rec, "have")))
	_, err = r.Pull(context.Background(), f.request(t, "job-3", cred, &log))
	require.NoError(t, err)
	calls = f.calls(t)
	assert.Equal(t, "pull", calls[len(calls)-2][0], "a record whose image is gone is pulled again")

	// A failed pull is classified like a built-in's.
	f2 := newFixture(t)
	r2 := f2.runtime(t, refTemplate+"error_prefix = \"Error:\"\n")
	require.NoError(t, os.WriteFile(filepath.Join(f2.rec, "pull-fails"), nil, 0o600))
	_, err = r2.Pull(context.Background(), f2.request(t, "job-1", auth.Credential{}, &log))
	require.Error(t, err)
	assert.True(t, failure.ClassOf(err) == failure.User, "an image that is not there is the job's mistake: %v", err)
}

// TestCheckOnlyTemplate: a site that provides images (no pull) finds
// them with check; a job asking for another image fails as its own
// mistake.
func TestCheckOnlyTemplate(t *testing.T) {
	f := newFixture(t)
	r := f.runtime(t, strings.Replace(strings.Replace(refTemplate, `pull = ["rt", "pull", "{auth}", "{ref}"]`, "", 1), `auth = ["--auth={authfile}"]`, "", 1))
	var log bytes.Buffer
	_, err := r.Pull(context.Background(), f.request(t, "job-1", auth.Credential{}, &log))
	require.Error(t, err)
	assert.True(t, failure.ClassOf(err) == failure.User)
	assert.Contains(t, err.Error(), "is not provided on this host")
	require.NoError(t, os.WriteFile(filepath.Join(f.rec, "have"), nil, 0o600))
	img, err := r.Pull(context.Background(), f.request(t, "job-1", auth.Credential{}, &log))
	require.NoError(t, err)
	assert.Equal(t, "registry.example.org:5050/ci/tool@"+digest, img.Handle)
	for _, c := range f.calls(t) {
		assert.Equal(t, "check", c[0])
	}
}

// TestAnonymousTemplateSaysSo: a template with no way to pass credentials
// pulls anonymously, and the job log says so.
func TestAnonymousTemplateSaysSo(t *testing.T) {
	f := newFixture(t)
	r := f.runtime(t, strings.Replace(strings.Replace(refTemplate, `"{auth}", `, "", 1), `auth = ["--auth={authfile}"]`, "", 1))
	creds := mechtest.Creds{Names: r.CredentialVariables(), User: "alice"}
	var log bytes.Buffer
	_, err := r.Pull(context.Background(), f.request(t, "job-1", creds.FromUser(t, "registry.example.org:5050", "pw"), &log))
	require.NoError(t, err)
	assert.Contains(t, log.String(), "passes no registry credentials")
}
