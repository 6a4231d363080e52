package podman

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/failure"
)

// fakePodman installs a podman that prints version and help as given and
// fails when asked to (a file next to it says so).
func fakePodman(t *testing.T, version, help string) (*Runtime, string) {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "bin")
	require.NoError(t, os.Mkdir(bin, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "version"), []byte(version), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "help"), []byte(help), 0o644))
	script := "#!/bin/sh\ncase \"$1\" in\n--version) cat " + dir + "/version; [ ! -e " + dir + "/fail ] ;;\n" +
		"run) cat " + dir + "/help ;;\n*) exit 125 ;;\nesac\n"
	require.NoError(t, os.WriteFile(filepath.Join(bin, "podman"), []byte(script), 0o755))
	cfg := config.Mechanism{ApplicationPath: bin, ImageStorageDir: dir}
	return New(cfg, config.UserInfo{Name: jobUser, Home: jobHome}, nil, time.Second, 1001), dir
}

const help43 = `Options:
      --init                                     Run an init binary inside the container that forwards signals and reaps processes
      --log-driver string                        Logging driver for the container (default "k8s-file")
      --preserve-fds uint                        Pass a number of additional file descriptors into the container
      --replace                                  If a container with the same name exists, replace it
`

func TestProbe(t *testing.T) {
	t.Run("4.3.1", func(t *testing.T) {
		r, dir := fakePodman(t, "podman version 4.3.1\n", help43)
		info, err := r.Probe(context.Background())
		require.NoError(t, err)
		assert.Equal(t, "4.3.1", info.Version)
		assert.Equal(t, map[string]string{"podman": filepath.Join(dir, "bin", "podman")}, info.Programs)
		assert.Equal(t, map[string]bool{FeatureInit: true, FeatureLogDriverNone: true, FeaturePreserveFDs: true, FeatureReplace: true}, info.Features)
		assert.True(t, info.ReadOnlyBinds)
	})
	t.Run("without --init and --log-driver the command leaves them out", func(t *testing.T) {
		r, _ := fakePodman(t, "podman version 4.0.0\n", "      --preserve-fds uint  x\n      --replace  y\n")
		info, err := r.Probe(context.Background())
		require.NoError(t, err)
		s := spec()
		s.Info = info
		argv, _, err := r.Command(s)
		require.NoError(t, err)
		assert.NotContains(t, argv, "--init")
		assert.NotContains(t, argv, "--log-driver")
	})
	for name, c := range map[string]struct{ version, help, fail, want string }{
		"too old":            {"podman version 3.4.4\n", "      --init x\n", "", "needs Podman 4.0 or later"},
		"unreadable version": {"Segmentation fault\n", help43, "", "cannot read the version"},
		"version fails":      {"Error: cannot re-exec process\n", help43, "fail", "--version failed"},
	} {
		t.Run(name, func(t *testing.T) {
			r, dir := fakePodman(t, c.version, c.help)
			if c.fail != "" {
				require.NoError(t, os.WriteFile(filepath.Join(dir, "fail"), nil, 0o644))
			}
			_, err := r.Probe(context.Background())
			require.Error(t, err)
			assert.Contains(t, err.Error(), c.want)
			assert.Equal(t, failure.System, failure.ClassOf(err))
		})
	}
	t.Run("no podman", func(t *testing.T) {
		r, dir := fakePodman(t, "", "")
		require.NoError(t, os.Remove(filepath.Join(dir, "bin", "podman")))
		_, err := r.Probe(context.Background())
		assert.ErrorContains(t, err, "podman not found")
	})
}
