package stages

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/job"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/policy"
)

func viewSetup(data string) containerSetup {
	l := job.Layout{
		DataDir:    data,
		BuildsDir:  filepath.Join(data, "builds/r/000"),
		CacheDir:   filepath.Join(data, "cache/r"),
		ScriptsDir: filepath.Join(data, "scripts/r/000/7"),
		StateDir:   filepath.Join(data, "state/r/000/7"),
	}
	return containerSetup{Layout: l}
}

func TestViewCreatesMountPointsOnlyWhereNeeded(t *testing.T) {
	s := viewSetup("/srv/ci/u")
	got, err := s.View(mechanism.Info{ReadOnlyBinds: true}, []policy.Bind{{Src: "/scratch/x", Dst: "/data"}})
	require.NoError(t, err)
	assert.Equal(t, []policy.Bind{
		policy.SamePath(s.Layout.BuildsDir), policy.SamePath(s.Layout.CacheDir),
		{Src: s.Layout.ScriptsDir, Dst: s.Layout.ScriptsDir, ReadOnly: true},
		{Src: "/scratch/x", Dst: "/data"},
	}, got, "a runtime that makes its own mount points gets the job's dirs and volumes only, never the data dir")
}

func TestViewSkeletonHidesTheDataDir(t *testing.T) {
	// Not under /tmp: that case is TestViewUnderTmpIsThePrivateTmp.
	data, err := os.MkdirTemp("/var/tmp", "ci-exec-view-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(data) })
	s := viewSetup(data)
	require.NoError(t, os.MkdirAll(s.Layout.StateDir, 0o700))
	// A planted symlink in an old view must not be followed.
	old := filepath.Join(s.Layout.StateDir, "view", "0")
	require.NoError(t, os.MkdirAll(old, 0o700))
	outside := t.TempDir()
	require.NoError(t, os.Symlink(outside, filepath.Join(old, "builds")))

	got, err := s.View(mechanism.Info{FixedMountPoints: true}, nil)
	require.NoError(t, err)
	require.Len(t, got, 4)
	skel := filepath.Join(s.Layout.StateDir, "view", "0")
	require.Equal(t, policy.Bind{Src: skel, Dst: data}, got[0], "the skeleton covers the data dir first")
	assert.Equal(t, []policy.Bind{policy.SamePath(s.Layout.BuildsDir), policy.SamePath(s.Layout.CacheDir), policy.SamePath(s.Layout.ScriptsDir)}, got[1:])
	for _, rel := range []string{"builds/r/000", "cache/r", "scripts/r/000/7"} {
		fi, err := os.Lstat(filepath.Join(skel, rel))
		require.NoError(t, err)
		assert.True(t, fi.IsDir(), rel)
	}
	ents, err := os.ReadDir(skel)
	require.NoError(t, err)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	assert.ElementsMatch(t, []string{"builds", "cache", "scripts"}, names, "no state or store in the skeleton")
	left, err := os.ReadDir(outside)
	require.NoError(t, err)
	assert.Empty(t, left, "the old view's symlink was removed, not followed")
}

func TestViewUnderTmpIsThePrivateTmp(t *testing.T) {
	data := "/tmp/ci-exec-view-test/u"
	t.Cleanup(func() { os.RemoveAll("/tmp/ci-exec-view-test") })
	s := viewSetup(data)
	s.Layout.StateDir = filepath.Join(t.TempDir(), "state")
	got, err := s.View(mechanism.Info{FixedMountPoints: true}, []policy.Bind{{Src: "/scratch/a", Dst: "/tmp/in"}})
	require.NoError(t, err)
	require.Len(t, got, 5)
	assert.Equal(t, "/tmp", got[0].Dst, "one skeleton at /tmp, no second one for the data dir")
	for _, rel := range []string{"ci-exec-view-test/u/builds/r/000", "in"} {
		assert.DirExists(t, filepath.Join(got[0].Src, rel))
	}
}

func TestUserVolumesMayNotCoverTheJobsDirs(t *testing.T) {
	root := t.TempDir()
	src := filepath.Join(root, "scratch", "v")
	require.NoError(t, os.MkdirAll(src, 0o755))
	for _, dst := range []string{"/srv/ci/u", "/srv/ci", "/srv/ci/u/builds/r/000/x", "/srv"} {
		s := viewSetup("/srv/ci/u")
		s.Runtime = namedRuntime{}
		s.Cfg.UserVolumeVariable = "CH_VOLUMES"
		s.Cfg.VolumePrefixes = []string{filepath.Join(root, "scratch")}
		s.Job = &job.Job{Vars: map[string]string{"CH_VOLUMES_0": src + ":" + dst}}
		_, err := s.UserVolumes(mechanism.Info{})
		require.Error(t, err, dst)
		assert.Contains(t, err.Error(), "would cover the job's own", dst)
	}
}

// namedRuntime is a Runtime with only a name: the policy code asks no more.
type namedRuntime struct{ mechanism.Runtime }

func (namedRuntime) Name() string { return "test" }

func TestViewIsKeptWhileIntact(t *testing.T) {
	data, err := os.MkdirTemp("/var/tmp", "ci-exec-view-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(data) })
	s := viewSetup(data)
	require.NoError(t, os.MkdirAll(s.Layout.StateDir, 0o700))
	first, err := s.View(mechanism.Info{FixedMountPoints: true}, nil)
	require.NoError(t, err)
	// What the container wrote into its view stays while the mount points
	// are real directories...
	written := filepath.Join(first[0].Src, "left-by-the-job")
	require.NoError(t, os.WriteFile(written, nil, 0o600))
	second, err := s.View(mechanism.Info{FixedMountPoints: true}, nil)
	require.NoError(t, err)
	assert.Equal(t, first, second)
	assert.FileExists(t, written)
	// ...and a mount point replaced by a file means a new view.
	cache := filepath.Join(first[0].Src, "cache", "r")
	require.NoError(t, os.RemoveAll(cache))
	require.NoError(t, os.WriteFile(cache, nil, 0o600))
	_, err = s.View(mechanism.Info{FixedMountPoints: true}, nil)
	require.NoError(t, err)
	assert.DirExists(t, cache)
	assert.NoFileExists(t, written)
}
