package job

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/testenv"
)

func writeResponse(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "response.json")
	require.NoError(t, os.WriteFile(p, []byte(body), 0o600))
	return p
}

func TestFromEnviron(t *testing.T) {
	resp := writeResponse(t, `{"id":77,"token":"trusted-job-token","job_info":{"project_full_path":"g/p"},
		"variables":[{"key":"CI_REGISTRY","value":"registry.example.org:5050","public":true},
		             {"key":"SECRET_THING","value":"s3cr3t-value","public":false,"masked":true},
		             {"key":"CI_REGISTRY","value":"evil.example.com","public":true}],
		"image":{"name":"alpine:3"},"unknown_field":{"x":1},
		"dependencies":[{"id":70,"name":"build","token":"trusted-job-token"},{"id":71,"name":"other","token":"dependency-token"}]}`)
	j, err := FromEnviron([]string{
		"PATH=/usr/bin", "BUILD_FAILURE_EXIT_CODE=11", "SYSTEM_FAILURE_EXIT_CODE=12",
		"BUILD_EXIT_CODE_FILE=/tmp/x/code", "JOB_RESPONSE_FILE=" + resp,
		"CUSTOM_ENV_CI_JOB_ID=99", "CUSTOM_ENV_CI_JOB_TOKEN=user-overridden-token",
		"CUSTOM_ENV_CI_REGISTRY=evil.example.com", "CUSTOM_ENV_EMPTY=", "NOEQUALS",
	})
	require.NoError(t, err)
	assert.Equal(t, 11, j.BuildFailureCode)
	assert.Equal(t, 12, j.SystemFailureCode)
	assert.Equal(t, "/tmp/x/code", j.ExitCodeFile)
	assert.Equal(t, "/usr/bin", j.Host["PATH"])
	assert.NotContains(t, j.Host, "CUSTOM_ENV_CI_JOB_ID")
	assert.Equal(t, "", j.Vars["EMPTY"])
	// Trusted values win over user-controllable CUSTOM_ENV_ ones.
	assert.Equal(t, int64(77), j.ID())
	assert.Equal(t, "trusted-job-token", j.Token())
	reg, ok := j.TrustedVar("CI_REGISTRY")
	assert.True(t, ok)
	assert.Equal(t, "registry.example.org:5050", reg, "first occurrence is the server's predefined value")
	assert.Equal(t, "alpine:3", j.Image(), "payload image when CI_JOB_IMAGE is absent")
	assert.ElementsMatch(t, []string{"trusted-job-token", "dependency-token", "s3cr3t-value", "user-overridden-token"}, j.Secrets())
	assert.Equal(t, []string{"trusted-job-token", "dependency-token"}, j.Tokens(), "only trusted tokens, each once")
}

func TestFromEnvironDefaultsAndErrors(t *testing.T) {
	j, err := FromEnviron(nil)
	require.NoError(t, err)
	assert.Equal(t, 1, j.BuildFailureCode)
	assert.Equal(t, 2, j.SystemFailureCode)
	assert.Nil(t, j.Response)
	assert.Equal(t, "", j.Token())
	assert.Empty(t, j.Tokens())
	j, err = FromEnviron([]string{"CUSTOM_ENV_CI_JOB_TOKEN=from-the-variable"})
	require.NoError(t, err)
	assert.Equal(t, []string{"from-the-variable"}, j.Tokens(), "without a payload the variable is all there is")

	_, err = FromEnviron([]string{"BUILD_FAILURE_EXIT_CODE=abc"})
	assert.ErrorContains(t, err, "BUILD_FAILURE_EXIT_CODE")
	_, err = FromEnviron([]string{"JOB_RESPONSE_FILE=/nonexistent/response.json"})
	assert.ErrorContains(t, err, "read job response")
	_, err = FromEnviron([]string{"JOB_RESPONSE_FILE=" + writeResponse(t, "{not json")})
	assert.ErrorContains(t, err, "decode job response")
}

func TestLayout(t *testing.T) {
	j := &Job{Vars: map[string]string{"CI_RUNNER_SHORT_TOKEN": "abc123", "CI_CONCURRENT_ID": "7"},
		Response: &Response{ID: 4242}}
	l := NewLayout("/srv/ci/bob/", j)
	assert.Equal(t, Layout{
		DataDir:    "/srv/ci/bob",
		BuildsDir:  "/srv/ci/bob/builds/abc123/007",
		CacheDir:   "/srv/ci/bob/cache/abc123",
		ScriptsDir: "/srv/ci/bob/scripts/abc123/007/4242",
		StateDir:   "/srv/ci/bob/state/abc123/007/4242",
	}, l)

	// User-overridable values that are not plain path components are ignored.
	for _, bad := range []string{"../../etc", "..", "a/b", "", ".hidden", "x y"} {
		j := &Job{Vars: map[string]string{"CI_RUNNER_SHORT_TOKEN": bad, "CI_CONCURRENT_ID": "-1"}, Response: &Response{ID: 1}}
		l := NewLayout("/d", j)
		assert.Equal(t, "/d/builds/runner/000", l.BuildsDir, "token %q", bad)
	}
	j = &Job{Vars: map[string]string{"CI_RUNNER_ID": "12", "CI_CONCURRENT_ID": "x"}, Response: &Response{ID: 5}}
	assert.Equal(t, "/d/scripts/12/000/5", NewLayout("/d", j).ScriptsDir)
}

func TestLayoutCreate(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	j := &Job{Vars: map[string]string{"CI_RUNNER_SHORT_TOKEN": "tok"}, Response: &Response{ID: 3}}
	l := NewLayout(data, j)
	require.NoError(t, l.Create())
	require.NoError(t, l.Create(), "idempotent")
	for _, d := range []string{l.BuildsDir, l.CacheDir, l.ScriptsDir, filepath.Join(data, "builds")} {
		fi, err := os.Stat(d)
		require.NoError(t, err)
		assert.True(t, fi.IsDir())
		assert.Equal(t, os.FileMode(0o700), fi.Mode().Perm(), d)
		assert.Equal(t, uint32(os.Getuid()), fi.Sys().(*syscall.Stat_t).Uid)
	}

	// A too-open top-level dir is tightened; a symlink is refused.
	require.NoError(t, os.Chmod(filepath.Join(data, "cache"), 0o777))
	require.NoError(t, l.Create())
	fi, _ := os.Stat(filepath.Join(data, "cache"))
	assert.Equal(t, os.FileMode(0o700), fi.Mode().Perm())

	data2 := filepath.Join(t.TempDir(), "data2")
	require.NoError(t, os.MkdirAll(data2, 0o700))
	require.NoError(t, os.Symlink(t.TempDir(), filepath.Join(data2, "builds")))
	err := NewLayout(data2, j).Create()
	assert.ErrorContains(t, err, "not a directory")
}

func TestLayoutCreateRefusesOtherUsersDir(t *testing.T) {
	testenv.RequireRoot(t)
	data := filepath.Join(t.TempDir(), "shared")
	require.NoError(t, os.MkdirAll(filepath.Join(data, "builds"), 0o700))
	require.NoError(t, os.Chown(filepath.Join(data, "builds"), 12345, 12345))
	err := NewLayout(data, &Job{Vars: map[string]string{}, Response: &Response{ID: 1}}).Create()
	require.Error(t, err)
	assert.Contains(t, err.Error(), "belongs to uid 12345")
	assert.Contains(t, err.Error(), "$USER")
}
