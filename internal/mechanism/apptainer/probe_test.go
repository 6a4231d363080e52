package apptainer

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/mechanism/mechtest"
)

func TestProbe(t *testing.T) {
	tests := []struct {
		name       string
		setup      func(t *testing.T, f *fakeApptainer)
		wantErr    string
		wantVer    string
		wantUnderl bool
	}{
		{"1.5.3 with underlay", nil, "", "1.5.3", true},
		{"bare version output", func(t *testing.T, f *fakeApptainer) { f.Set(t, "version", "1.5.3\n") }, "", "1.5.3", true},
		{"help without --underlay", func(t *testing.T, f *fakeApptainer) {
			f.Set(t, "help", strings.ReplaceAll(helpWithUnderlay, "--underlay", "--overlay "))
		}, "", "1.5.3", false},
		{"unreadable version", func(t *testing.T, f *fakeApptainer) { f.Set(t, "version", "Segmentation fault\n") },
			"cannot read the version", "", false},
		{"version fails", func(t *testing.T, f *fakeApptainer) {
			f.Set(t, "version", "FATAL:   broken install\n")
			f.Set(t, "version-fail", "")
		}, "version failed", "", false},
		{"exec --help fails", func(t *testing.T, f *fakeApptainer) { f.Unset(t, "help") }, "exec --help failed", "", false},
		{"no apptainer", func(t *testing.T, f *fakeApptainer) {
			require.NoError(t, os.Remove(filepath.Join(f.App, "apptainer")))
		}, "apptainer not found", "", false},
		{"apptainer not executable", func(t *testing.T, f *fakeApptainer) {
			require.NoError(t, os.Chmod(filepath.Join(f.App, "apptainer"), 0o644))
		}, "apptainer not found", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := installFake(t, config.Mechanism{}, hostileHostEnv)
			if tt.setup != nil {
				tt.setup(t, f)
			}
			info, err := f.rt.Probe(context.Background())
			if tt.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tt.wantErr)
				assert.Equal(t, failure.System, failure.ClassOf(err))
				// The failure is cached too: the probe is once per process.
				_, again := f.rt.Probe(context.Background())
				assert.Equal(t, err, again)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.wantVer, info.Version)
			assert.Equal(t, map[string]string{"apptainer": filepath.Join(f.App, "apptainer")}, info.Programs)
			assert.Equal(t, tt.wantUnderl, info.Features[FeatureUnderlay])
			assert.True(t, info.Features[mechanism.FeatureServices])
			assert.True(t, info.ReadOnlyBinds)

			// Cached: a broken apptainer afterwards changes nothing.
			f.Set(t, "version", "garbage\n")
			require.NoError(t, os.Remove(filepath.Join(f.App, "apptainer")))
			again, err := f.rt.Probe(context.Background())
			require.NoError(t, err)
			assert.Equal(t, info, again)
		})
	}
}

// TestProbeEnvironment: the probe runs apptainer with a minimal
// environment, not the driver's.
func TestProbeEnvironment(t *testing.T) {
	t.Setenv("APPTAINER_BIND", "/etc:/mnt")
	t.Setenv("LD_PRELOAD", "/nonexistent/evil.so")
	f := installFake(t, config.Mechanism{}, hostileHostEnv)
	// A version script that records its environment.
	script := "#!/bin/sh\nenv > '" + filepath.Join(f.Rec, "probe-env") + "'\n" +
		`case "$1" in version) echo 1.5.3 ;; exec) echo '--underlay' ;; esac` + "\n"
	require.NoError(t, os.WriteFile(filepath.Join(f.App, "apptainer"), []byte(script), 0o755))
	_, err := f.rt.Probe(context.Background())
	require.NoError(t, err)
	env := f.RecordedEnv(t, "probe-env")
	assert.ElementsMatch(t, []string{"PATH=" + toolPath, "USER=ciuser", "HOME=/home/ciuser", "LANG=C.UTF-8"}, env)
}

// TestProbeRemembered: the probe's answer is kept in the user's store for
// later processes while apptainer is unchanged, and asked again after an
// upgrade.
func TestProbeRemembered(t *testing.T) {
	f := installFake(t, config.Mechanism{}, nil)
	info, err := f.rt.Probe(context.Background())
	require.NoError(t, err)
	assert.FileExists(t, filepath.Join(f.StoreRoot(), "probe.json"))

	// Another process: the fake would now answer garbage, but is not asked.
	f.Set(t, "version", "garbage\n")
	again, err := runtimeFor(f.rt.Cfg, nil).Probe(context.Background())
	require.NoError(t, err)
	assert.Equal(t, info, again)

	// apptainer is upgraded (another size): asked again.
	bin := filepath.Join(f.App, "apptainer")
	script, err := os.ReadFile(bin)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(bin, append(script, "# 1.5.4\n"...), 0o755))
	f.Set(t, "version", "1.5.4\n")
	upgraded, err := runtimeFor(f.rt.Cfg, nil).Probe(context.Background())
	require.NoError(t, err)
	assert.Equal(t, "1.5.4", upgraded.Version)
}

func TestParseVersion(t *testing.T) {
	mechtest.Versions(t, ParseVersion, []mechtest.Version{
		{"bare, as 1.5.3 prints it", "1.5.3\n", "1.5.3"},
		{"with the program name", "apptainer version 1.5.3", "1.5.3"},
		{"with the program name and newline", "apptainer version 1.5.3\n", "1.5.3"},
		{"git build", "1.4.0-rc.1+12-gabc", "1.4.0-rc.1+12-gabc"},
		{"distribution release", "1.3.6-1.el9\n", "1.3.6-1.el9"},
		{"two parts", "1.5\n", "1.5"},
		{"leading v", "v1.5.3\n", "1.5.3"},
		{"after a warning line", "WARNING: something odd\n1.5.3\n", "1.5.3"},
		{"surrounded by blanks", "\n   1.5.3   \n", "1.5.3"},
		{"garbage", "apptainer: command not found\n", ""},
		{"FATAL", "FATAL:   could not open config\n", ""},
		{"empty", "", ""},
		{"bare number", "1\n", ""},
		{"inside a sentence", "this is apptainer 1.5.3 indeed\n", ""},
		{"singularity's banner", "singularity-ce version 4.1.0\n", ""},
	})
}
