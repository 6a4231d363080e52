package charliecloud

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/job"
)

const (
	testUser     = "ciuser"
	testHome     = "/home/ciuser"
	testRegistry = "127.0.0.1:5443"
	userPassword = "pass-word-123"
	jobToken     = "glcbt-job-token-0123456789"
)

// newRuntime is the runtime under test for user ciuser.
func newRuntime(cfg config.Mechanism, hostEnv map[string]string) *Runtime {
	return New(cfg, config.UserInfo{Name: testUser, Home: testHome}, hostEnv, time.Second)
}

// userCredential is a credential from the user's CH_IMAGE_* variables.
func userCredential(t *testing.T) auth.Credential {
	t.Helper()
	j := &job.Job{Vars: map[string]string{"CH_IMAGE_USERNAME": "u", "CH_IMAGE_PASSWORD": userPassword}}
	c, err := auth.Choose(j, testRegistry, newRuntime(config.Mechanism{}, nil).CredentialVariables())
	require.NoError(t, err)
	require.Equal(t, auth.UserVariables, c.Source)
	return c
}

// jobTokenCredential is gitlab-ci-token with the job's token, chosen because
// the image's registry is the job's trusted CI_REGISTRY.
func jobTokenCredential(t *testing.T) auth.Credential {
	t.Helper()
	j := &job.Job{
		Vars: map[string]string{},
		Response: &job.Response{
			Token:     jobToken,
			Variables: []job.Variable{{Key: "CI_REGISTRY", Value: testRegistry, Public: true}},
		},
	}
	c, err := auth.Choose(j, testRegistry, newRuntime(config.Mechanism{}, nil).CredentialVariables())
	require.NoError(t, err)
	require.Equal(t, auth.JobToken, c.Source)
	require.Equal(t, auth.JobTokenUser, c.Username)
	return c
}

// entry is one file, directory or symlink that makeTree creates under a root.
type entry struct {
	path    string
	content string
	link    string
	dir     bool
	mode    os.FileMode
}

func makeTree(t *testing.T, root string, entries []entry) {
	t.Helper()
	for _, e := range entries {
		p := filepath.Join(root, e.path)
		require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		switch {
		case e.dir:
			mode := e.mode
			if mode == 0 {
				mode = 0o755
			}
			require.NoError(t, os.MkdirAll(p, 0o755))
			require.NoError(t, os.Chmod(p, mode))
		case e.link != "":
			require.NoError(t, os.Symlink(e.link, p))
		default:
			mode := e.mode
			if mode == 0 {
				mode = 0o644
			}
			require.NoError(t, os.WriteFile(p, []byte(e.content), mode))
			require.NoError(t, os.Chmod(p, mode))
		}
	}
}

func file(path, content string, mode os.FileMode) entry {
	return entry{path: path, content: content, mode: mode}
}
func dirEntry(path string, mode os.FileMode) entry { return entry{path: path, dir: true, mode: mode} }
func symlink(path, target string) entry            { return entry{path: path, link: target} }
