package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func fakeDriver(t *testing.T) (driver, root string) {
	t.Helper()
	root = t.TempDir()
	src, err := os.ReadFile("../../internal/runnerdouble/testdata/fakedriver.sh")
	require.NoError(t, err)
	driver = filepath.Join(root, "fakedriver.sh")
	require.NoError(t, os.WriteFile(driver, src, 0o755))
	require.NoError(t, os.Mkdir(filepath.Join(root, "rec"), 0o755))
	return driver, root
}

func TestRunjob(t *testing.T) {
	driver, root := fakeDriver(t)
	common := []string{"--driver", driver, "--config", "/etc/ci-exec/test.toml",
		"--env", "FAKE_REC=" + filepath.Join(root, "rec"), "--env", "FAKE_ROOT=" + root,
		"--var", "GREETING=hello world", "--after", "echo after=$CI_JOB_STATUS", "--timeout", "20s"}

	var out, errb bytes.Buffer
	code := run(append(common, "--", `echo "$GREETING"`), &out, &errb)
	assert.Equal(t, 0, code, errb.String())
	assert.Contains(t, out.String(), "\nhello world\n")
	assert.Contains(t, out.String(), "after=success\n")
	assert.True(t, strings.HasSuffix(out.String(), "job finished: state=success failure_reason= exit_code=0\n"), out.String())
	cfgPath, err := os.ReadFile(filepath.Join(root, "rec", "1-config-path"))
	require.NoError(t, err)
	assert.Equal(t, "/etc/ci-exec/test.toml\n", string(cfgPath), "--config PATH precedes the stage subcommand")

	out.Reset()
	code = run(append(common, "--", "exit 3"), &out, &errb)
	assert.Equal(t, 1, code)
	assert.Contains(t, out.String(), "ERROR: Job failed: exit status 3\n")
	assert.True(t, strings.HasSuffix(out.String(),
		"job finished: state=failed failure_reason=script_failure exit_code=3\n"), out.String())
}

func TestRunjobUsage(t *testing.T) {
	var out, errb bytes.Buffer
	assert.Equal(t, 2, run([]string{"--", "echo"}, &out, &errb))
	assert.Contains(t, errb.String(), "--driver is required")
	assert.Equal(t, 2, run([]string{"--driver", "/bin/true", "--var", "novalue"}, &out, &errb))
}
