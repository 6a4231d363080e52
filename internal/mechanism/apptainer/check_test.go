package apptainer

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/mechanism"
)

// CheckImage is what stands between a state file and apptainer's command
// line.
func TestCheckImageAcceptsOnlyStoreEntries(t *testing.T) {
	root := t.TempDir()
	r := runtimeFor(config.Mechanism{ImageStorageDir: root}, nil)
	st, err := r.Store()
	require.NoError(t, err)
	good := mechanism.Image{Format: FormatSIF, Handle: st.Path("sha256-" + strings.Repeat("b", 64) + ".sif"), Shell: "/bin/sh",
		Lease: filepath.Join(st.Root, "refs", "k", "j1-abc")}
	assert.NoError(t, r.CheckImage(good, "/state"))
	for name, edit := range map[string]func(*mechanism.Image){
		"a planted SIF":        func(i *mechanism.Image) { i.Handle = "/builds/evil.sif" },
		"a SIF next to store":  func(i *mechanism.Image) { i.Handle = filepath.Join(st.Root, filepath.Base(good.Handle)) },
		"run options":          func(i *mechanism.Image) { i.RunOptions = []string{"--bind=/etc:/mnt"} },
		"a shell of the job's": func(i *mechanism.Image) { i.Shell = "/builds/evil" },
		"a lease elsewhere":    func(i *mechanism.Image) { i.Lease = "/home/u/.bashrc" },
		"other format":         func(i *mechanism.Image) { i.Format = "sandbox" },
	} {
		img := good
		edit(&img)
		assert.Error(t, r.CheckImage(img, "/state"), name)
	}
}
