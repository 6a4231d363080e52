package charliecloud

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/mechanism"
)

// CheckImage is what stands between a state file and ch-run's command line.
func TestCheckImageAcceptsOnlyWhatPullMakes(t *testing.T) {
	root := t.TempDir()
	r := newRuntime(config.Mechanism{ImageStorageDir: root}, nil)
	st, err := r.Store()
	if !assert.NoError(t, err) {
		return
	}
	jobDir := filepath.Join(root, "state")
	entry := st.Path("sha256-" + strings.Repeat("a", 64) + "-0123456789ab.sqfs")
	mnt := filepath.Join(jobDir, "j42-abc.mnt")
	lease := filepath.Join(st.Root, "refs", "k", "j42-abc")
	copyImg := mechanism.Image{Format: FormatStorage, Handle: jobImageRepo + ":j42-abc", Shell: "/bin/sh",
		Private: []string{filepath.Join(r.Storage, "img", forPath(jobImageRepo+":j42-abc"))}, RunOptions: []string{"--set-env"}}
	squash := mechanism.Image{Format: FormatSquash, Handle: entry, Shell: "/bin/bash", Lease: lease,
		Private: []string{mnt}, RunOptions: []string{"--mount=" + mnt, "--set-env"}}
	assert.NoError(t, r.CheckImage(copyImg, jobDir))
	own := filepath.Join(r.jobsDir(), "j42-abc")
	dirImg := mechanism.Image{Format: FormatDir, Handle: own, Shell: "/bin/sh", Private: []string{own}}
	assert.NoError(t, r.CheckImage(dirImg, jobDir))
	dirImg.Handle, dirImg.Private = "/builds/evil", []string{"/builds/evil"}
	assert.Error(t, r.CheckImage(dirImg, jobDir), "a directory image outside the jobs dir")
	assert.NoError(t, r.CheckImage(squash, jobDir))

	bad := map[string]func(*mechanism.Image){
		"planted --bind":            func(i *mechanism.Image) { i.RunOptions = append(i.RunOptions, "--bind=/etc:/mnt") },
		"another user's image name": func(i *mechanism.Image) { i.Handle = "library/evil:latest" },
		"a planted SquashFS":        func(i *mechanism.Image) { i.Format, i.Handle = FormatSquash, "/tmp/evil.sqfs" },
		"a shell of the job's":      func(i *mechanism.Image) { i.Shell = "/builds/evil" },
		"private path elsewhere":    func(i *mechanism.Image) { i.Private = []string{"/home/u/important"} },
		"unknown format":            func(i *mechanism.Image) { i.Format = "dir" },
	}
	for name, edit := range bad {
		img := copyImg
		edit(&img)
		assert.Error(t, r.CheckImage(img, jobDir), name)
	}
	badSquash := map[string]func(*mechanism.Image){
		"mount point outside the state dir": func(i *mechanism.Image) {
			i.Private = []string{"/tmp/x.mnt"}
			i.RunOptions = []string{"--mount=/tmp/x.mnt"}
		},
		"a --mount other than its own": func(i *mechanism.Image) { i.RunOptions = []string{"--mount=/etc"} },
		"a lease outside the store":    func(i *mechanism.Image) { i.Lease = "/home/u/.bashrc" },
		"an entry outside the store":   func(i *mechanism.Image) { i.Handle = filepath.Join(root, filepath.Base(entry)) },
	}
	for name, edit := range badSquash {
		img := squash
		img.RunOptions = append([]string(nil), squash.RunOptions...)
		edit(&img)
		assert.Error(t, r.CheckImage(img, jobDir), name)
	}
}
