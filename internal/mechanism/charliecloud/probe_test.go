package charliecloud

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

// help031 is an excerpt of `ch-run --help` from Charliecloud 0.31.
const help031 = `Usage: ch-run [OPTION...] IMAGE -- COMMAND [ARG...]

Run a command in a Charliecloud container.

  -b, --bind=SRC[:DST]       mount SRC at guest DST (default: same as SRC)
  -c, --cd=DIR               initial working directory in container
      --env-no-expand        don't expand $ in --set-env input
      --feature=FEAT         exit successfully if FEAT is supported
  -g, --gid=GID              run as GID within container
  -s, --storage=DIR          set image storage directory to DIR
  -w, --write                mount image read-write (avoid)
  -?, --help                 give this help list
`

// help038 has the --write-fake option of newer releases.
const help038 = `Usage: ch-run [OPTION...] IMAGE -- COMMAND [ARG...]

  -b, --bind=SRC[:DST]       mount SRC at guest DST (default: same as SRC)
  -w, --write                mount image read-write (avoid)
  -W, --write-fake[=SIZE]    overlay read-write tmpfs on top of image
  -?, --help                 give this help list
`

func TestParseFeatures(t *testing.T) {
	tests := []struct {
		name string
		help string
		want bool
	}{
		{"0.31 has no --write-fake", help031, false},
		{"0.38 has -W, --write-fake", help038, true},
		{"long option only", "      --write-fake           overlay\n", true},
		{"mentioned in a description only", "  -w, --write   like --write-fake but persistent\n", false},
		{"longer option name is not --write-fake", "      --write-fakeness   no\n", false},
		{"empty", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, map[string]bool{FeatureWriteFake: tt.want}, ParseFeatures(tt.help))
		})
	}
}

func writeScript(t *testing.T, path, body string, mode os.FileMode) {
	t.Helper()
	require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
	require.NoError(t, os.WriteFile(path, []byte("#!/bin/sh\n"+body), mode))
	require.NoError(t, os.Chmod(path, mode))
}

// fakeChRun is a ch-run that prints its version on stderr, as the real one
// does, and refuses to start without $USER.
func fakeChRun(version, help string) string {
	return `[ -n "$USER" ] || { echo "ch-run[1]: error: \$USER not set" >&2; exit 1; }
case "$1" in
--version) echo '` + version + `' >&2 ;;
--help) cat <<'HELP'
` + help + `HELP
;;
*) exit 64 ;;
esac
`
}

func TestProbe(t *testing.T) {
	tests := []struct {
		name      string
		programs  map[string]string // name -> script body
		wantErr   string
		wantVer   string
		wantWF    bool
		wantProgs []string
	}{
		{"0.31 without ch-convert", map[string]string{"ch-run": fakeChRun("0.31", help031), "ch-image": ""},
			"", "0.31", false, []string{"ch-image", "ch-run"}},
		{"0.38 with write-fake", map[string]string{"ch-run": fakeChRun("0.38", help038), "ch-image": "", "ch-convert": ""},
			"", "0.38", true, []string{"ch-convert", "ch-image", "ch-run"}},
		{"no ch-image", map[string]string{"ch-run": fakeChRun("0.31", help031)}, "ch-image not found", "", false, nil},
		{"no ch-run", map[string]string{"ch-image": ""}, "ch-run not found", "", false, nil},
		{"unreadable version", map[string]string{"ch-run": fakeChRun("oops", help031), "ch-image": ""}, "cannot read the version", "", false, nil},
		{"ch-run fails", map[string]string{"ch-run": "echo broken >&2; exit 2\n", "ch-image": ""}, "--version failed", "", false, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			app := t.TempDir()
			for name, body := range tt.programs {
				writeScript(t, filepath.Join(app, name), body, 0o755)
			}
			r := newRuntime(config.Mechanism{ApplicationPath: app, ImageStorageDir: t.TempDir()}, nil)
			info, err := r.Probe(context.Background())
			if tt.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tt.wantErr)
				assert.Equal(t, failure.System, failure.ClassOf(err))
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.wantVer, info.Version)
			assert.Equal(t, map[string]bool{FeatureWriteFake: tt.wantWF, mechanism.FeatureServices: true, mechanism.FeatureGPU: false}, info.Features)
			assert.False(t, info.ReadOnlyBinds)
			var progs []string
			for name, p := range info.Programs {
				progs = append(progs, name)
				assert.Equal(t, filepath.Join(app, name), p)
			}
			assert.ElementsMatch(t, tt.wantProgs, progs)

			// The answer is cached: removing the programs changes nothing.
			require.NoError(t, os.RemoveAll(app))
			again, err := r.Probe(context.Background())
			require.NoError(t, err)
			assert.Equal(t, info, again)
		})
	}
}

// TestProbeRemembered: the probe's answer is kept in the user's store for
// later processes while the programs are unchanged, and asked again when
// one of them changes (an upgrade) or appears.
func TestProbeRemembered(t *testing.T) {
	app := t.TempDir()
	images := t.TempDir()
	calls := filepath.Join(t.TempDir(), "calls")
	chRun := func(version string) string {
		return "echo \"$1\" >> '" + calls + "'\n" + fakeChRun(version, help031)
	}
	writeScript(t, filepath.Join(app, "ch-run"), chRun("0.31"), 0o755)
	writeScript(t, filepath.Join(app, "ch-image"), "", 0o755)
	cfg := config.Mechanism{ApplicationPath: app, ImageStorageDir: images}
	ranCh := func() int {
		b, err := os.ReadFile(calls)
		if os.IsNotExist(err) {
			return 0
		}
		require.NoError(t, err)
		return strings.Count(string(b), "\n")
	}

	info, err := newRuntime(cfg, nil).Probe(context.Background())
	require.NoError(t, err)
	assert.Equal(t, "0.31", info.Version)
	assert.Equal(t, 2, ranCh(), "--version and --help")
	cache := filepath.Join(images, "ciuser.ci-exec", "charliecloud", "probe.json")
	assert.FileExists(t, cache)

	// Another process (a new runtime) with the same programs: not run.
	again, err := newRuntime(cfg, nil).Probe(context.Background())
	require.NoError(t, err)
	assert.Equal(t, info, again)
	assert.Equal(t, 2, ranCh())

	// ch-convert appears: probed again, and it is known.
	writeScript(t, filepath.Join(app, "ch-convert"), "", 0o755)
	info, err = newRuntime(cfg, nil).Probe(context.Background())
	require.NoError(t, err)
	assert.Equal(t, 4, ranCh())
	assert.Equal(t, filepath.Join(app, "ch-convert"), info.Programs["ch-convert"])

	// ch-run is upgraded: probed again.
	writeScript(t, filepath.Join(app, "ch-run"), chRun("0.38.1"), 0o755)
	info, err = newRuntime(cfg, nil).Probe(context.Background())
	require.NoError(t, err)
	assert.Equal(t, "0.38.1", info.Version)
	assert.Equal(t, 6, ranCh())

	// A failed probe is not remembered.
	writeScript(t, filepath.Join(app, "ch-run"), "echo broken >&2; exit 2\n", 0o755)
	_, err = newRuntime(cfg, nil).Probe(context.Background())
	require.Error(t, err)
	writeScript(t, filepath.Join(app, "ch-run"), chRun("0.38.1"), 0o755)
	info, err = newRuntime(cfg, nil).Probe(context.Background())
	require.NoError(t, err)
	assert.Equal(t, "0.38.1", info.Version)
}

func TestParseVersion(t *testing.T) {
	mechtest.Versions(t, ParseVersion, []mechtest.Version{
		{"debian 12", "0.31\n", "0.31"},
		{"no newline", "0.38", "0.38"},
		{"pre-release", "0.39~pre+1a2b3c", "0.39~pre+1a2b3c"},
		{"three parts", "0.38.1\n", "0.38.1"},
		{"program name and v", "ch-run v0.33\n", "0.33"},
		{"after a warning line", "ch-run[5]: warning: something\n0.31\n", "0.31"},
		{"surrounding blanks", "\n  0.32  \n", "0.32"},
		{"garbage", "ch-run: command not found\n", ""},
		{"empty", "", ""},
		{"bare number", "31\n", ""},
		{"version inside a sentence", "this is version 0.31 of it\n", ""},
	})
}
