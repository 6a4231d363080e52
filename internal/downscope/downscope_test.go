package downscope

import (
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/authz"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/testenv"
)

func TestChildEnvIsClean(t *testing.T) {
	cfg, err := config.Parse("[general]\ndata_dir = \"/d/$USER\"\npass_env = [\"PATH\", \"http_proxy\"]\n", config.UserInfo{Name: "root", Home: "/root"})
	require.NoError(t, err)
	a := &authz.Account{Name: "alice", UID: 1234, GID: 1234, Home: "/home/alice", Shell: "/bin/bash"}
	env := childEnv([]string{
		"PATH=/usr/bin", "HOME=/root", "USER=root", "LOGNAME=root", "SHELL=/bin/zsh",
		"RUNNER_SECRET=s3cr3t", "http_proxy=http://proxy:3128", "TMPDIR=/tmp/custom-executor1",
		"JOB_RESPONSE_FILE=/tmp/custom-executor1/response.json", "BUILD_EXIT_CODE_FILE=/tmp/custom-executor1/code",
		"BUILD_FAILURE_EXIT_CODE=1", "SYSTEM_FAILURE_EXIT_CODE=2",
		"CI_EXEC_BUILDS_DIR=/d/alice/builds", "CI_EXEC_CONFIG=/etc/other.toml",
		"CUSTOM_ENV_CI_JOB_ID=7", "CUSTOM_ENV_GITLAB_USER_LOGIN=root",
	}, cfg, a)
	slices.Sort(env)
	assert.Equal(t, []string{
		"BUILD_FAILURE_EXIT_CODE=1", "CI_EXEC_BUILDS_DIR=/d/alice/builds",
		"CUSTOM_ENV_CI_JOB_ID=7", "CUSTOM_ENV_GITLAB_USER_LOGIN=root",
		"HOME=/home/alice", "LOGNAME=alice", "PATH=/usr/bin", "SHELL=/bin/bash",
		"SYSTEM_FAILURE_EXIT_CODE=2", "USER=alice", "http_proxy=http://proxy:3128",
	}, env)
}

// requireRoot: these create dirs for other accounts (a failure under the
// test command, which runs as root).
func requireRoot(t *testing.T) { testenv.RequireRoot(t) }

func TestStateRootRefusesDirsOthersCanWrite(t *testing.T) {
	base := t.TempDir()
	require.NoError(t, os.Chmod(base, 0o755))
	shared := filepath.Join(base, "shared")
	require.NoError(t, os.Mkdir(shared, 0o777))
	require.NoError(t, os.Chmod(shared, 0o777))
	_, err := openStateRoot(filepath.Join(shared, "state"))
	require.Error(t, err)
	assert.Contains(t, err.Error(), shared+" is writable by group or others")
}

func TestStateRootUnderTrustedDirs(t *testing.T) {
	requireRoot(t)
	dir, err := os.MkdirTemp("/var/lib", "ci-exec-unit-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.NoError(t, os.Chmod(dir, 0o755))
	r, err := openStateRoot(filepath.Join(dir, "state"))
	require.NoError(t, err)
	fi, err := os.Stat(string(r))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o700), fi.Mode().Perm())
	require.NoError(t, r.write(42, identityFile, []byte("{}")))
	fi, err = os.Stat(filepath.Join(r.jobDir(42), identityFile))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())

	// A dir of another account above it is refused.
	other := filepath.Join(dir, "other")
	require.NoError(t, os.Mkdir(other, 0o755))
	require.NoError(t, os.Chown(other, 4242, 4242))
	_, err = openStateRoot(filepath.Join(other, "state"))
	if err == nil {
		t.Fatal("a state_dir under another account's dir must be refused")
	}
	assert.Contains(t, err.Error(), "belongs to uid 4242")
}

func TestEnsureDataDir(t *testing.T) {
	requireRoot(t)
	base := t.TempDir()
	a := &authz.Account{Name: "alice", UID: 4243, GID: 4243}
	p := privilege{root: true, chown: true}

	// Under a root-owned dir: created for the user, 0700.
	dd := filepath.Join(base, "alice")
	require.NoError(t, ensureDataDir(dd, a, p))
	fi, err := os.Lstat(dd)
	require.NoError(t, err)
	assert.Equal(t, uint32(4243), fi.Sys().(*syscall.Stat_t).Uid)
	assert.Equal(t, os.FileMode(0o700), fi.Mode().Perm())
	require.NoError(t, ensureDataDir(dd, a, p), "an existing one of the user's is fine")

	// Under the user's own dir: left to the user's stage (nothing of
	// root's in the user's tree).
	home := filepath.Join(base, "home")
	require.NoError(t, os.Mkdir(home, 0o755))
	require.NoError(t, os.Chown(home, 4243, 4243))
	require.NoError(t, ensureDataDir(filepath.Join(home, ".ci-exec"), a, p))
	assert.NoDirExists(t, filepath.Join(home, ".ci-exec"))

	// A planted link or someone else's dir is refused.
	link := filepath.Join(base, "link")
	require.NoError(t, os.Symlink("/etc", link))
	err = ensureDataDir(link, a, p)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "is not a directory")
	theirs := filepath.Join(base, "bob")
	require.NoError(t, os.Mkdir(theirs, 0o700))
	require.NoError(t, os.Chown(theirs, 4244, 4244))
	err = ensureDataDir(theirs, a, p)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "belongs to uid 4244")

	// Without CAP_CHOWN it cannot create one for the user.
	err = ensureDataDir(filepath.Join(base, "carol"), a, privilege{})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "CAP_CHOWN")
}

func TestSweepRemovesOnlyAbandonedStates(t *testing.T) {
	r := stateRoot(t.TempDir())
	require.NoError(t, r.write(1, identityFile, []byte("{}")))
	require.NoError(t, r.write(2, identityFile, []byte("{}")))
	old := time.Now().Add(-staleAge - time.Hour)
	require.NoError(t, os.Chtimes(r.jobDir(1), old, old))
	r.sweep(time.Now())
	assert.NoDirExists(t, r.jobDir(1))
	assert.DirExists(t, r.jobDir(2))
}
