package imagecache

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
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

// waits collects the store's Waiting reports of every job in a test.
type waits chan string

// ctx is a context whose store calls report their waits to w.
func (w waits) ctx() context.Context {
	return WithTrace(context.Background(), Trace{Waiting: func(reason string) { w <- reason }})
}

// next returns the next reported wait whose reason starts with prefix,
// failing the test (from the test's goroutine only) after a minute.
func (w waits) next(prefix string) (string, error) {
	deadline := time.After(time.Minute)
	for {
		select {
		case r := <-w:
			if strings.HasPrefix(r, prefix) {
				return r, nil
			}
		case <-deadline:
			return "", fmt.Errorf("no job reported waiting for %q", prefix)
		}
	}
}

func TestEnsureSingleFlight(t *testing.T) {
	st := open(t, Limits{})
	w := make(waits, 16)
	var builds atomic.Int32
	var wg sync.WaitGroup
	results := make([]Result, 8)
	errs := make([]error, 8)
	for i := range results {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			results[i], errs[i] = st.Ensure(w.ctx(), "cold.sqfs", fmt.Sprintf("j%d", i), ValidSquashFS, func(_ context.Context, tmp string) error {
				builds.Add(1)
				// The build ends only once the seven others wait for it.
				for n := 0; n < len(results)-1; n++ {
					if _, err := w.next("another job of yours is building this image"); err != nil {
						return err
					}
				}
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
	w := make(waits, 16)
	var running, most atomic.Int32
	started := make(chan int, 3)
	release := make(chan struct{})
	errs := make(chan error, 3)
	for i := 0; i < 3; i++ {
		go func(i int) {
			_, err := st.Ensure(w.ctx(), fmt.Sprintf("k%d.sqfs", i), "j1", ValidSquashFS, func(_ context.Context, tmp string) error {
				n := running.Add(1)
				for {
					m := most.Load()
					if n <= m || most.CompareAndSwap(m, n) {
						break
					}
				}
				started <- i
				<-release
				running.Add(-1)
				return squash(tmp, 4096)
			})
			errs <- err
		}(i)
	}
	// One build runs; the two others report waiting for the slot, and
	// each starts only when the one before it has ended.
	for n := 0; n < 2; n++ {
		_, err := w.next("a build slot")
		require.NoError(t, err)
	}
	for n := 0; n < 3; n++ {
		select {
		case <-started:
		case <-time.After(time.Minute):
			t.Fatalf("build %d did not start", n+1)
		}
		assert.Equal(t, int32(1), running.Load())
		release <- struct{}{}
	}
	for n := 0; n < 3; n++ {
		assert.NoError(t, <-errs)
	}
	assert.Equal(t, int32(1), most.Load(), "max_concurrent_builds = 1")
}

func TestEnsureGivesUpWithTheContext(t *testing.T) {
	st := open(t, Limits{})
	unlock, _, err := st.lock(context.Background(), "key-busy.sqfs", "")
	require.NoError(t, err)
	defer unlock()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// Given up as soon as it waits.
	ctx = WithTrace(ctx, Trace{Waiting: func(string) { cancel() }})
	_, err = st.Ensure(ctx, "busy.sqfs", "j1", ValidSquashFS, func(context.Context, string) error { return nil })
	assert.ErrorIs(t, err, context.Canceled)
	assert.False(t, st.inUse("busy.sqfs", time.Now()), "no lease is left")
}

// TestKilledBuilderLeavesNothingUsable kills a builder process with SIGKILL
// in the middle of its build: its lock goes with it, its half-written file
// is never published, and the next Ensure builds the entry.
func TestKilledBuilderLeavesNothingUsable(t *testing.T) {
	root := filepath.Join(t.TempDir(), "store")
	_, err := Open(root, Limits{})
	require.NoError(t, err)
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "IMAGECACHE_HELPER=build", "IMAGECACHE_HELPER_ROOT="+root)
	stdin, err := cmd.StdinPipe() // the builder waits on it: never written
	require.NoError(t, err)
	defer stdin.Close()
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	line, err := bufio.NewReader(stdout).ReadString('\n')
	require.NoError(t, err)
	require.Equal(t, "building\n", line, "the builder says when it is half-way")
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

// TestMain runs the helper processes of the tests when started as one
// (IMAGECACHE_HELPER says which): the builder that
// TestKilledBuilderLeavesNothingUsable kills, which writes half an image,
// says so on stdout and waits on stdin; and the store users of
// TestStoreWithoutLocks, on a "file system" whose flock(2) fails.
func TestMain(m *testing.M) {
	root := os.Getenv("IMAGECACHE_HELPER_ROOT")
	switch os.Getenv("IMAGECACHE_HELPER") {
	case "":
		os.Exit(m.Run())
	case "build":
		st, err := Open(root, Limits{})
		if err != nil {
			os.Exit(3)
		}
		_, _ = st.Ensure(context.Background(), "k.sqfs", "j1", ValidSquashFS, func(_ context.Context, tmp string) error {
			_ = os.WriteFile(tmp, []byte("hsqs, half"), 0o644)
			fmt.Println("building")
			_, _ = io.Copy(io.Discard, os.Stdin)
			return nil
		})
		os.Exit(4)
	case "open":
		failFlock(os.Getenv("IMAGECACHE_HELPER_ERRNO"))
		_, err := Open(root, Limits{})
		fmt.Println(err)
	case "use":
		st, err := Open(root, Limits{})
		if err != nil {
			fmt.Println("open:", err)
			os.Exit(3)
		}
		failFlock(os.Getenv("IMAGECACHE_HELPER_ERRNO"))
		_, err = st.Ensure(context.Background(), "k.sqfs", "j1", ValidSquashFS, func(_ context.Context, tmp string) error { return squash(tmp, 4096) })
		fmt.Println(err)
		_, err = st.BuildSlot(context.Background())
		fmt.Println(err)
		_, err = st.Lock(context.Background(), "pull-x", "")
		fmt.Println(err)
	}
	os.Exit(0)
}

// failFlock makes every flock(2) of this process fail with the errno
// named (ENOSYS, ENOLCK, EOPNOTSUPP): what Lustre without -o flock, NFSv3
// without its lock service and some FUSE file systems answer. It installs
// a seccomp filter on all threads; the process cannot undo it.
func failFlock(name string) {
	errno := map[string]syscall.Errno{"ENOSYS": syscall.ENOSYS, "ENOLCK": syscall.ENOLCK, "EOPNOTSUPP": syscall.EOPNOTSUPP}[name]
	filter := []unix.SockFilter{
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: 0}, // seccomp_data.nr
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, Jt: 0, Jf: 1, K: unix.SYS_FLOCK},
		{Code: unix.BPF_RET | unix.BPF_K, K: unix.SECCOMP_RET_ERRNO | uint32(errno)},
		{Code: unix.BPF_RET | unix.BPF_K, K: unix.SECCOMP_RET_ALLOW},
	}
	prog := unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		fmt.Println("prctl:", err)
		os.Exit(5)
	}
	if _, _, e := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, unix.SECCOMP_FILTER_FLAG_TSYNC, uintptr(unsafe.Pointer(&prog))); e != 0 {
		fmt.Println("seccomp:", e)
		os.Exit(5)
	}
}

// TestStoreWithoutLocks: a store on a file system whose flock(2) fails
// (Lustre without -o flock, NFSv3 without lockd) is refused with a system
// error that names the mount option, at Open and at every lock, never
// used without locks. The file system's answer is made real with a
// seccomp filter in a helper process.
func TestStoreWithoutLocks(t *testing.T) {
	for _, errno := range []string{"ENOSYS", "ENOLCK", "EOPNOTSUPP"} {
		t.Run(errno, func(t *testing.T) {
			root := filepath.Join(t.TempDir(), "store")
			run := func(mode string) string {
				cmd := exec.Command(os.Args[0])
				cmd.Env = append(os.Environ(), "IMAGECACHE_HELPER="+mode, "IMAGECACHE_HELPER_ROOT="+root, "IMAGECACHE_HELPER_ERRNO="+errno)
				out, err := cmd.CombinedOutput()
				require.NoError(t, err, string(out))
				return string(out)
			}
			out := run("open")
			assert.Contains(t, out, "image store "+root+": "+ErrNoLocks.Error())
			assert.Contains(t, out, "mount it with -o flock")
			assert.Contains(t, out, "not -o nolock")
			assert.Contains(t, out, syscall.Errno(map[string]syscall.Errno{"ENOSYS": syscall.ENOSYS, "ENOLCK": syscall.ENOLCK, "EOPNOTSUPP": syscall.EOPNOTSUPP}[errno]).Error())

			lines := strings.Split(strings.TrimSpace(run("use")), "\n")
			require.Len(t, lines, 3, "Ensure, BuildSlot, Lock")
			for _, l := range lines {
				assert.Contains(t, l, ErrNoLocks.Error())
				assert.Contains(t, l, "-o flock")
			}
			st, err := Open(root, Limits{})
			require.NoError(t, err)
			assert.NoFileExists(t, st.Path("k.sqfs"), "nothing was built without the lock")
			assert.False(t, st.inUse("k.sqfs", time.Now()), "no lease is left")
		})
	}
}

func TestLockErr(t *testing.T) {
	st := &Store{Root: "/scratch/alice.ci-exec/charliecloud"}
	for _, errno := range []syscall.Errno{syscall.ENOSYS, syscall.ENOLCK, syscall.EOPNOTSUPP} {
		err := st.lockErr("key-k.sqfs", errno)
		assert.ErrorIs(t, err, ErrNoLocks, errno.Error())
		assert.ErrorIs(t, err, errno)
		assert.NotContains(t, err.Error(), "\n")
	}
	err := st.lockErr("key-k.sqfs", context.Canceled)
	assert.NotErrorIs(t, err, ErrNoLocks)
	assert.ErrorIs(t, err, context.Canceled)
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
		unlock, _, err := st.lock(context.Background(), "key-old.sqfs", "")
		require.NoError(t, err)
		out, err := st.Evict(context.Background(), now)
		unlock()
		require.NoError(t, err)
		assert.Empty(t, out)
		assert.FileExists(t, st.Path("old.sqfs"))
	})
	t.Run("by the size an entry stands for", func(t *testing.T) {
		// Each 1 MiB entry stands for 3 MiB: new.sqfs and the one in use
		// fit in 6 MiB.
		st := setup(t, Limits{MaxBytes: 6 << 20, EntrySize: func(string) int64 { return 3 << 20 }})
		out, err := st.Evict(context.Background(), now)
		require.NoError(t, err)
		keys := []string{}
		for _, e := range out {
			keys = append(keys, e.Key)
			assert.Equal(t, int64(3<<20), e.Size)
		}
		assert.Equal(t, []string{"old.sqfs", "mid.sqfs"}, keys)
		assert.FileExists(t, st.Path("new.sqfs"))
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
	unlock, _, err := st.lock(context.Background(), "key-k.sqfs", "")
	require.NoError(t, err)
	w := make(waits, 4)
	got := make(chan Result, 1)
	errs := make(chan error, 1)
	go func() {
		r, err := st.Ensure(w.ctx(), "k.sqfs", "j1-c", ValidSquashFS, build)
		errs <- err
		got <- r
	}()
	_, err = w.next("another job of yours is building this image")
	require.NoError(t, err)
	select {
	case <-got:
		t.Fatal("Ensure did not wait for the key's lock")
	default:
	}
	require.NoError(t, os.Remove(st.Path("k.sqfs"))) // what the evictor did
	unlock()
	require.NoError(t, <-errs)
	r := <-got
	assert.False(t, r.Hit, "the evicted entry is rebuilt")
	assert.True(t, r.Waited)
	assert.NoError(t, ValidSquashFS(r.Path))
}

// TestUseWhileTheLastLeaseIsReleased: Release removes refs/KEY with the
// last lease; a Use of the same key made that directory an instant before
// and must still get its lease (it used to fail with ENOENT, failing the
// prepare).
func TestUseWhileTheLastLeaseIsReleased(t *testing.T) {
	st := open(t, Limits{})
	other, err := st.Use("k.sqfs", "j1-other")
	require.NoError(t, err)
	raced := false
	testHookUse = func() {
		if !raced {
			raced = true
			// The other job's cleanup, between this Use's mkdir and write.
			assert.NoError(t, st.Release(other))
			assert.NoDirExists(t, filepath.Join(st.Root, "refs", "k.sqfs"), "Release removed the directory")
		}
	}
	defer func() { testHookUse = func() {} }()
	lease, err := st.Use("k.sqfs", "j2-this")
	require.NoError(t, err)
	assert.True(t, raced)
	assert.FileExists(t, lease)
	assert.True(t, st.inUse("k.sqfs", time.Now()))
}

// TestUseAndReleaseConcurrently: jobs taking and dropping leases on one
// key at once never fail.
func TestUseAndReleaseConcurrently(t *testing.T) {
	st := open(t, Limits{})
	errs := make(chan error, 4)
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 500; i++ {
				lease, err := st.Use("k.sqfs", fmt.Sprintf("j%d-%d", g, i))
				if err == nil {
					err = st.Release(lease)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		assert.NoError(t, err)
	}
}

// TestEnsureSaysWhyAnEntryWasRebuilt: the check that failed on the stored
// entry is reported with the rebuild, and with the error when the damaged
// entry cannot even be removed.
func TestEnsureSaysWhyAnEntryWasRebuilt(t *testing.T) {
	st := open(t, Limits{})
	build := func(_ context.Context, tmp string) error { return squash(tmp, 8192) }
	_, err := st.Ensure(context.Background(), "k.sqfs", "j1", ValidSquashFS, build)
	require.NoError(t, err)
	require.NoError(t, os.Truncate(st.Path("k.sqfs"), 4096))
	res, err := st.Ensure(context.Background(), "k.sqfs", "j2", ValidSquashFS, build)
	require.NoError(t, err)
	assert.ErrorContains(t, res.Damaged, "truncated SquashFS file: 4096 bytes")
	res, err = st.Ensure(context.Background(), "k.sqfs", "j3", ValidSquashFS, build)
	require.NoError(t, err)
	assert.NoError(t, res.Damaged, "a valid entry is not damaged")

	// A directory in the entry's place: not an image, and not removable.
	require.NoError(t, os.MkdirAll(filepath.Join(st.Path("d.sqfs"), "x"), 0o700))
	_, err = st.Ensure(context.Background(), "d.sqfs", "j1", ValidSquashFS, build)
	require.Error(t, err)
	assert.ErrorContains(t, err, "is not a regular file", "why it was to be removed")
	assert.ErrorContains(t, err, "directory not empty", "why it could not be")
}
