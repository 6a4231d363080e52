package imagecache

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func open(t *testing.T, l Limits) *Store {
	t.Helper()
	st, err := Open(filepath.Join(t.TempDir(), "store"), l)
	require.NoError(t, err)
	return st
}

// squash writes a minimal valid SquashFS header of n bytes to path.
func squash(path string, n int) error {
	b := make([]byte, n)
	copy(b, "hsqs")
	binary.LittleEndian.PutUint64(b[40:48], uint64(n))
	return os.WriteFile(path, b, 0o644)
}

func TestOpenIsPrivate(t *testing.T) {
	st := open(t, Limits{})
	for _, d := range append([]string{""}, subdirs...) {
		fi, err := os.Stat(filepath.Join(st.Root, d))
		require.NoError(t, err)
		assert.Equal(t, os.FileMode(0o700), fi.Mode().Perm(), d)
	}
	assert.Equal(t, 2, st.Limits.MaxBuilds, "default build slots")

	base := t.TempDir()
	require.NoError(t, os.Symlink(t.TempDir(), filepath.Join(base, "link")))
	_, err := Open(filepath.Join(base, "link"), Limits{})
	assert.ErrorContains(t, err, "symlink")

	loose := filepath.Join(base, "loose")
	require.NoError(t, os.Mkdir(loose, 0o755))
	_, err = Open(loose, Limits{})
	require.NoError(t, err)
	fi, _ := os.Stat(loose)
	assert.Equal(t, os.FileMode(0o700), fi.Mode().Perm(), "a store others could enter is closed")

	if os.Getuid() == 0 {
		other := filepath.Join(base, "other")
		require.NoError(t, os.Mkdir(other, 0o700))
		require.NoError(t, os.Chown(other, 4242, 4242))
		_, err = Open(other, Limits{})
		assert.ErrorContains(t, err, "belongs to uid 4242")
	}
}

func TestEnsureBuildsOnceThenHits(t *testing.T) {
	st := open(t, Limits{})
	builds := 0
	build := func(_ context.Context, tmp string) error { builds++; return squash(tmp, 4096) }
	res, err := st.Ensure(context.Background(), "k1.sqfs", "j1", ValidSquashFS, build)
	require.NoError(t, err)
	assert.False(t, res.Hit)
	assert.Equal(t, st.Path("k1.sqfs"), res.Path)
	assert.NoError(t, ValidSquashFS(res.Path))

	res, err = st.Ensure(context.Background(), "k1.sqfs", "j1", ValidSquashFS, build)
	require.NoError(t, err)
	assert.True(t, res.Hit)
	assert.False(t, res.Waited)
	assert.Equal(t, 1, builds)
	left, _ := os.ReadDir(filepath.Join(st.Root, "tmp"))
	assert.Empty(t, left)
}

func TestEnsureFailedBuildPublishesNothing(t *testing.T) {
	st := open(t, Limits{})
	_, err := st.Ensure(context.Background(), "k1.sqfs", "j1", ValidSquashFS, func(_ context.Context, tmp string) error {
		_ = os.WriteFile(tmp, []byte("hsqs half"), 0o644)
		return errors.New("pull failed")
	})
	assert.ErrorContains(t, err, "pull failed")
	assert.NoFileExists(t, st.Path("k1.sqfs"))

	_, err = st.Ensure(context.Background(), "k1.sqfs", "j1", ValidSquashFS, func(_ context.Context, tmp string) error {
		return os.WriteFile(tmp, []byte("not an image at all, long enough to read a header from....................................................."), 0o644)
	})
	assert.ErrorContains(t, err, "not valid")
	assert.NoFileExists(t, st.Path("k1.sqfs"), "an invalid build is never published")
	left, _ := os.ReadDir(filepath.Join(st.Root, "tmp"))
	assert.Empty(t, left)
}

func TestEnsureSingleFlight(t *testing.T) {
	st := open(t, Limits{})
	var builds atomic.Int32
	var wg sync.WaitGroup
	results := make([]Result, 8)
	errs := make([]error, 8)
	for i := range results {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			results[i], errs[i] = st.Ensure(context.Background(), "cold.sqfs", "j1", ValidSquashFS, func(_ context.Context, tmp string) error {
				builds.Add(1)
				time.Sleep(300 * time.Millisecond)
				return squash(tmp, 8192)
			})
		}(i)
	}
	wg.Wait()
	assert.Equal(t, int32(1), builds.Load(), "eight concurrent jobs, one build")
	misses := 0
	for i := range results {
		require.NoError(t, errs[i])
		assert.Equal(t, st.Path("cold.sqfs"), results[i].Path)
		if !results[i].Hit {
			misses++
		} else {
			assert.True(t, results[i].Waited, "the others waited for the builder")
		}
	}
	assert.Equal(t, 1, misses)
}

func TestEnsureRebuildsDamagedEntry(t *testing.T) {
	st := open(t, Limits{})
	build := func(_ context.Context, tmp string) error { return squash(tmp, 8192) }
	_, err := st.Ensure(context.Background(), "k.sqfs", "j1", ValidSquashFS, build)
	require.NoError(t, err)
	require.NoError(t, os.Truncate(st.Path("k.sqfs"), 4096))
	assert.ErrorContains(t, ValidSquashFS(st.Path("k.sqfs")), "truncated")

	res, err := st.Ensure(context.Background(), "k.sqfs", "j1", ValidSquashFS, build)
	require.NoError(t, err)
	assert.False(t, res.Hit, "a truncated entry is a miss")
	assert.NoError(t, ValidSquashFS(res.Path))
}

func TestBuildSlotsCapConcurrency(t *testing.T) {
	st := open(t, Limits{MaxBuilds: 1})
	var running, most atomic.Int32
	var wg sync.WaitGroup
	for i := 0; i < 3; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			_, err := st.Ensure(context.Background(), fmt.Sprintf("k%d.sqfs", i), "j1", ValidSquashFS, func(_ context.Context, tmp string) error {
				n := running.Add(1)
				for {
					m := most.Load()
					if n <= m || most.CompareAndSwap(m, n) {
						break
					}
				}
				time.Sleep(100 * time.Millisecond)
				running.Add(-1)
				return squash(tmp, 4096)
			})
			assert.NoError(t, err)
		}(i)
	}
	wg.Wait()
	assert.Equal(t, int32(1), most.Load(), "max_concurrent_builds = 1")
}

func TestEnsureGivesUpWithTheContext(t *testing.T) {
	st := open(t, Limits{})
	unlock, _, err := st.lock(context.Background(), "key-busy.sqfs")
	require.NoError(t, err)
	defer unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err = st.Ensure(ctx, "busy.sqfs", "j1", ValidSquashFS, func(context.Context, string) error { return nil })
	assert.ErrorIs(t, err, context.DeadlineExceeded)
}

// TestKilledBuilderLeavesNothingUsable kills a builder process with SIGKILL
// in the middle of its build: its lock goes with it, its half-written file
// is never published, and the next Ensure builds the entry.
func TestKilledBuilderLeavesNothingUsable(t *testing.T) {
	root := filepath.Join(t.TempDir(), "store")
	_, err := Open(root, Limits{})
	require.NoError(t, err)
	started := filepath.Join(t.TempDir(), "started")
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "IMAGECACHE_HELPER_ROOT="+root, "IMAGECACHE_HELPER_STARTED="+started)
	require.NoError(t, cmd.Start())
	require.Eventually(t, func() bool { _, err := os.Stat(started); return err == nil }, 10*time.Second, 20*time.Millisecond)
	require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
	_ = cmd.Wait()

	st, err := Open(root, Limits{})
	require.NoError(t, err)
	assert.NoFileExists(t, st.Path("k.sqfs"), "nothing was published")
	left, _ := filepath.Glob(filepath.Join(root, "tmp", "k.sqfs.*"))
	assert.NotEmpty(t, left, "the killed build left its temporary file")
	res, err := st.Ensure(context.Background(), "k.sqfs", "j1", ValidSquashFS, func(_ context.Context, tmp string) error { return squash(tmp, 4096) })
	require.NoError(t, err)
	assert.False(t, res.Hit)
	left, _ = filepath.Glob(filepath.Join(root, "tmp", "k.sqfs.*"))
	assert.Empty(t, left, "leftovers are removed by the next build")
}

// TestMain runs the builder that TestKilledBuilderLeavesNothingUsable
// kills when started as that helper process: it writes half an image and
// waits.
func TestMain(m *testing.M) {
	root := os.Getenv("IMAGECACHE_HELPER_ROOT")
	if root == "" {
		os.Exit(m.Run())
	}
	st, err := Open(root, Limits{})
	if err != nil {
		os.Exit(3)
	}
	_, _ = st.Ensure(context.Background(), "k.sqfs", "j1", ValidSquashFS, func(_ context.Context, tmp string) error {
		_ = os.WriteFile(tmp, []byte("hsqs, half"), 0o644)
		_ = os.WriteFile(os.Getenv("IMAGECACHE_HELPER_STARTED"), nil, 0o644)
		time.Sleep(time.Minute)
		return nil
	})
	os.Exit(4)
}

func TestTagsAndMeta(t *testing.T) {
	st := open(t, Limits{})
	d1 := "sha256:" + fmt.Sprintf("%064x", 1)
	assert.Equal(t, "", st.Tag("reg/a:1"))
	require.NoError(t, st.SetTag("reg/a:1", d1))
	assert.Equal(t, d1, st.Tag("reg/a:1"))
	assert.Equal(t, "", st.Tag("reg/a_1"), "names do not collide")
	assert.Error(t, st.SetTag("reg/a:1", "sha256:short"))

	assert.Equal(t, "", st.Meta("k", "shell"))
	require.NoError(t, st.SetMeta("k", "shell", "/bin/sh"))
	require.NoError(t, st.SetMeta("k", "setenv", "yes"))
	require.NoError(t, st.SetMeta("k", "shell", "/bin/bash"))
	assert.Equal(t, "/bin/bash", st.Meta("k", "shell"))
	assert.Equal(t, "yes", st.Meta("k", "setenv"))
	assert.Error(t, st.SetMeta("k", "a=b", "x"))
	assert.Error(t, st.SetMeta("k", "a", "x\ny=z"))
}

func TestKeysAndLeases(t *testing.T) {
	st := open(t, Limits{})
	for _, bad := range []string{"", "../x", "a/b", ".hidden", "A", "x..y"} {
		assert.Error(t, CheckKey(bad), bad)
		_, err := st.Use("k", bad)
		assert.Error(t, err, bad)
	}
	lease, err := st.Use("k.sqfs", "j1-abc")
	require.NoError(t, err)
	assert.FileExists(t, lease)
	assert.True(t, st.inUse("k.sqfs", time.Now()))
	for _, bad := range []string{st.Path("k.sqfs"), filepath.Join(st.Root, "refs", "k.sqfs"), "/etc/passwd", filepath.Join(st.Root, "refs", "k.sqfs", "..", "..", "entries", "k.sqfs")} {
		assert.Error(t, st.Release(bad), bad)
	}
	require.NoError(t, st.Release(lease))
	assert.False(t, st.inUse("k.sqfs", time.Now()))
	assert.NoError(t, st.Release(lease), "releasing twice is fine")
}

func TestEvict(t *testing.T) {
	now := time.Now()
	setup := func(t *testing.T, l Limits) *Store {
		st := open(t, l)
		for _, e := range []struct {
			key string
			age time.Duration
		}{{"old-used.sqfs", 72 * time.Hour}, {"old.sqfs", 48 * time.Hour}, {"mid.sqfs", 2 * time.Hour}, {"new.sqfs", time.Minute}} {
			require.NoError(t, squash(st.Path(e.key), 1<<20))
			require.NoError(t, os.Chtimes(st.Path(e.key), now.Add(-e.age), now.Add(-e.age)))
		}
		_, err := st.Use("old-used.sqfs", "j1-running")
		require.NoError(t, err)
		return st
	}
	t.Run("by age", func(t *testing.T) {
		st := setup(t, Limits{MaxAge: 24 * time.Hour})
		out, err := st.Evict(context.Background(), now)
		require.NoError(t, err)
		require.Len(t, out, 1)
		assert.Equal(t, "old.sqfs", out[0].Key)
		assert.FileExists(t, st.Path("old-used.sqfs"), "an image in use is never evicted")
		assert.FileExists(t, st.Path("mid.sqfs"))
	})
	t.Run("by size, least recently used first", func(t *testing.T) {
		st := setup(t, Limits{MaxBytes: 2 << 20})
		out, err := st.Evict(context.Background(), now)
		require.NoError(t, err)
		keys := []string{}
		for _, e := range out {
			keys = append(keys, e.Key)
		}
		assert.Equal(t, []string{"old.sqfs", "mid.sqfs"}, keys)
		assert.FileExists(t, st.Path("old-used.sqfs"))
		assert.FileExists(t, st.Path("new.sqfs"))
	})
	t.Run("a stale lease does not protect", func(t *testing.T) {
		st := setup(t, Limits{MaxAge: 24 * time.Hour})
		lease := filepath.Join(st.Root, "refs", "old-used.sqfs", "j1-running")
		require.NoError(t, os.Chtimes(lease, now.Add(-8*24*time.Hour), now.Add(-8*24*time.Hour)))
		out, err := st.Evict(context.Background(), now)
		require.NoError(t, err)
		assert.Len(t, out, 2)
		assert.NoFileExists(t, st.Path("old-used.sqfs"))
	})
	t.Run("an entry being built is skipped", func(t *testing.T) {
		st := setup(t, Limits{MaxAge: 24 * time.Hour})
		unlock, _, err := st.lock(context.Background(), "key-old.sqfs")
		require.NoError(t, err)
		out, err := st.Evict(context.Background(), now)
		unlock()
		require.NoError(t, err)
		assert.Empty(t, out)
		assert.FileExists(t, st.Path("old.sqfs"))
	})
	t.Run("no limits, no eviction", func(t *testing.T) {
		st := setup(t, Limits{})
		out, err := st.Evict(context.Background(), now)
		require.NoError(t, err)
		assert.Empty(t, out)
	})
}

func TestValidFormats(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.sqfs")
	require.NoError(t, squash(good, 4096))
	assert.NoError(t, ValidSquashFS(good))
	assert.ErrorContains(t, ValidSquashFS(filepath.Join(dir, "missing")), "no such file")
	short := filepath.Join(dir, "short")
	require.NoError(t, os.WriteFile(short, []byte("hsqs"), 0o644))
	assert.ErrorContains(t, ValidSquashFS(short), "too short")
	assert.ErrorContains(t, ValidSIF(good), "not a SIF")

	sif := make([]byte, 4096)
	copy(sif[32:], "SIF_MAGIC\x00")
	binary.LittleEndian.PutUint64(sif[112:120], 1024)
	binary.LittleEndian.PutUint64(sif[120:128], 3072)
	p := filepath.Join(dir, "x.sif")
	require.NoError(t, os.WriteFile(p, sif, 0o644))
	assert.NoError(t, ValidSIF(p))
	require.NoError(t, os.Truncate(p, 4000))
	assert.ErrorContains(t, ValidSIF(p), "truncated")
	assert.ErrorContains(t, ValidSquashFS(p), "bad magic")
	assert.ErrorContains(t, ValidSquashFS(dir), "not a regular file")
}

func TestEnsureLeases(t *testing.T) {
	st := open(t, Limits{MaxBytes: 1})
	build := func(_ context.Context, tmp string) error { return squash(tmp, 8192) }
	res, err := st.Ensure(context.Background(), "k.sqfs", "j1-a", ValidSquashFS, build)
	require.NoError(t, err)
	require.NotEmpty(t, res.Lease)
	out, err := st.Evict(context.Background(), time.Now())
	require.NoError(t, err)
	assert.Empty(t, out, "the entry Ensure returned is leased")
	require.NoError(t, st.Release(res.Lease))

	// A failed build leaves no lease (and no meta) behind.
	_, err = st.Ensure(context.Background(), "bad.sqfs", "j1-b", ValidSquashFS, func(_ context.Context, tmp string) error {
		_ = st.SetMeta("bad.sqfs", "shell", "/bin/sh")
		return errors.New("boom")
	})
	require.Error(t, err)
	assert.False(t, st.inUse("bad.sqfs", time.Now()))
	assert.NoFileExists(t, st.Path("bad.sqfs")+".meta")

	// While an eviction holds an entry's lock, a job waits rather than
	// taking a path that is about to disappear.
	unlock, _, err := st.lock(context.Background(), "key-k.sqfs")
	require.NoError(t, err)
	got := make(chan Result, 1)
	go func() {
		r, err := st.Ensure(context.Background(), "k.sqfs", "j1-c", ValidSquashFS, build)
		assert.NoError(t, err)
		got <- r
	}()
	select {
	case <-got:
		t.Fatal("Ensure did not wait for the key's lock")
	case <-time.After(300 * time.Millisecond):
	}
	require.NoError(t, os.Remove(st.Path("k.sqfs"))) // what the evictor did
	unlock()
	r := <-got
	assert.False(t, r.Hit, "the evicted entry is rebuilt")
	assert.True(t, r.Waited)
	assert.NoError(t, ValidSquashFS(r.Path))
}
