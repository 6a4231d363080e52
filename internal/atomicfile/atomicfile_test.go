package atomicfile

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// countSyncs counts the fsyncs made while the test runs, by the name of
// the file synced.
func countSyncs(t *testing.T) func() []string {
	var mu sync.Mutex
	var synced []string
	orig := syncFile
	syncFile = func(f *os.File) error {
		mu.Lock()
		synced = append(synced, f.Name())
		mu.Unlock()
		return orig(f)
	}
	t.Cleanup(func() { syncFile = orig })
	return func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), synced...)
	}
}

func TestWrite(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "state.json")
	require.NoError(t, os.WriteFile(p, []byte("old"), 0o644))
	old := syscall.Umask(0o077)
	defer syscall.Umask(old)
	synced := countSyncs(t)

	require.NoError(t, Write(p, []byte("new content"), 0o640))
	b, err := os.ReadFile(p)
	require.NoError(t, err)
	assert.Equal(t, "new content", string(b))
	fi, err := os.Stat(p)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o640), fi.Mode().Perm(), "the mode is perm, whatever the umask")
	left, _ := os.ReadDir(dir)
	assert.Len(t, left, 1, "no temporary file is left")

	s := synced()
	require.Len(t, s, 2, "the file, then its directory")
	assert.Equal(t, dir, filepath.Clean(filepath.Dir(s[0])), "the temporary file is in the target's directory")
	assert.NotEqual(t, p, s[0], "the data is synced before the rename")
	assert.Equal(t, filepath.Clean(dir), filepath.Clean(s[1]), "then the directory, after the rename")
}

func TestWriteVolatileSyncsNothing(t *testing.T) {
	synced := countSyncs(t)
	p := filepath.Join(t.TempDir(), "build_script.bash")
	require.NoError(t, WriteFrom(p, bytes.NewReader([]byte("#!/bin/bash\n")), 0o700, Volatile))
	b, err := os.ReadFile(p)
	require.NoError(t, err)
	assert.Equal(t, "#!/bin/bash\n", string(b))
	assert.Empty(t, synced())
}

type failingReader struct{ n int }

func (r *failingReader) Read(b []byte) (int, error) {
	if r.n == 0 {
		return 0, errors.New("disk gone")
	}
	r.n--
	return copy(b, "partial"), nil
}

func TestWriteFailureKeepsTheOldFile(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "tag")
	require.NoError(t, os.WriteFile(p, []byte("old"), 0o600))
	err := WriteFrom(p, &failingReader{n: 3}, 0o600)
	assert.ErrorContains(t, err, "disk gone")
	assert.ErrorContains(t, err, p)
	b, _ := os.ReadFile(p)
	assert.Equal(t, "old", string(b))
	left, _ := os.ReadDir(dir)
	assert.Len(t, left, 1, "the temporary file is removed")

	assert.Error(t, Write(filepath.Join(dir, "missing", "x"), nil, 0o600), "a missing directory")
}

// TestWriteIsAtomic: a reader never sees a mix of two versions or a
// partial file while writers replace it.
func TestWriteIsAtomic(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	a, b := bytes.Repeat([]byte("a"), 1<<20), bytes.Repeat([]byte("b"), 1<<20)
	require.NoError(t, Write(p, a, 0o600))
	done := make(chan struct{})
	errs := make(chan error, 1)
	go func() {
		defer close(done)
		for i := 0; i < 20; i++ {
			data := a
			if i%2 == 0 {
				data = b
			}
			if err := Write(p, data, 0o600, Volatile); err != nil {
				errs <- err
				return
			}
		}
	}()
	for reads := 0; ; reads++ {
		got, err := os.ReadFile(p)
		require.NoError(t, err)
		if !bytes.Equal(got, a) && !bytes.Equal(got, b) {
			t.Fatalf("read %d: a mixed or partial file of %d bytes", reads, len(got))
		}
		select {
		case <-done:
			select {
			case err := <-errs:
				t.Fatal(err)
			default:
			}
			return
		default:
		}
	}
}

func TestPublish(t *testing.T) {
	dir := t.TempDir()
	synced := countSyncs(t)
	src := filepath.Join(dir, "tmp", "k.sqfs.123.tmp")
	require.NoError(t, os.Mkdir(filepath.Dir(src), 0o700))
	require.NoError(t, os.WriteFile(src, []byte("hsqs"), 0o644))
	dst := filepath.Join(dir, "k.sqfs")
	require.NoError(t, Publish(src, dst))
	b, err := os.ReadFile(dst)
	require.NoError(t, err)
	assert.Equal(t, "hsqs", string(b))
	assert.NoFileExists(t, src)
	assert.Equal(t, []string{src, dir}, cleanAll(synced()), "the file before the rename, its new directory after")

	err = Publish(src, dst)
	assert.ErrorContains(t, err, dst, "a missing source")
}

func cleanAll(ps []string) []string {
	for i := range ps {
		ps[i] = filepath.Clean(ps[i])
	}
	return ps
}
