package charliecloud

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"golang.org/x/sys/unix"

	"github.com/ci-exec/ci-exec/internal/mechanism/mechtest"
	"github.com/ci-exec/ci-exec/internal/testenv"
)

func TestMkdirInImage(t *testing.T) {
	tests := []struct {
		name    string
		image   []entry
		mount   string
		wantDir string // relative to the root, checked when no error
	}{
		{"nested dirs created", nil, "/builds/group/project", "builds/group/project"},
		{"existing dirs kept", []entry{dirEntry("builds", 0o755), file("builds/keep", "k", 0o644)}, "/builds/x", "builds/x"},
		{"whole path exists", []entry{dirEntry("data/a", 0o755)}, "/data/a", "data/a"},
		{"unclean but absolute", nil, "/a//b/./c/", "a/b/c"},
		{"dot-dot inside stays inside", nil, "/a/../b", "b"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			makeTree(t, root, tt.image)
			require.NoError(t, mkdirInImage(root, tt.mount))
			fi, err := os.Lstat(filepath.Join(root, tt.wantDir))
			require.NoError(t, err)
			assert.True(t, fi.IsDir())
			for _, e := range tt.image {
				if !e.dir && e.link == "" {
					got, err := os.ReadFile(filepath.Join(root, e.path))
					require.NoError(t, err)
					assert.Equal(t, e.content, string(got))
				}
			}
		})
	}
}

func TestMkdirInImageRefusesSymlinks(t *testing.T) {
	tests := []struct {
		name      string
		link      string // the image's srv points here; "OUTSIDE" is replaced by a host dir
		mount     string
		component string
	}{
		// Like srv -> /etc, but aimed at a scratch dir so that a regression
		// cannot create anything in the host's /etc when run as root.
		{"absolute symlink to a host dir", "OUTSIDE", "/srv/x", "/srv"},
		{"absolute symlink, deeper mount point", "OUTSIDE", "/srv/x/y", "/srv"},
		{"relative symlink out of the image", "../../../../../../../../OUTSIDE", "/srv/x", "/srv"},
		{"dangling symlink", "/no/such/dir", "/srv/x", "/srv"},
		{"symlink as the mount point itself", "OUTSIDE", "/srv", "/srv"},
		{"symlink inside the image", "opt", "/srv/x", "/srv"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			base := t.TempDir()
			root := filepath.Join(base, "root")
			outside := filepath.Join(base, "outside")
			require.NoError(t, os.MkdirAll(filepath.Join(root, "opt"), 0o755))
			require.NoError(t, os.Mkdir(outside, 0o755))
			target := tt.link
			if target == "OUTSIDE" {
				target = outside
			} else if filepath.Base(target) == "OUTSIDE" {
				target = filepath.Join(filepath.Dir(target), "..", outside)
			}
			require.NoError(t, os.Symlink(target, filepath.Join(root, "srv")))

			err := mkdirInImage(root, tt.mount)
			require.Error(t, err)
			var sym *errSymlinkInImage
			require.True(t, errors.As(err, &sym), "want *errSymlinkInImage, got %T: %v", err, err)
			assert.Equal(t, tt.component, sym.component)
			assert.Equal(t, target, sym.target)
			assert.Equal(t, tt.mount, sym.path)
			assert.Contains(t, err.Error(), "symlink at "+tt.component)

			ents, err := os.ReadDir(outside)
			require.NoError(t, err)
			assert.Empty(t, ents, "nothing created outside the image")
			ents, err = os.ReadDir(filepath.Join(root, "opt"))
			require.NoError(t, err)
			assert.Empty(t, ents, "nothing created through an inner symlink either")
		})
	}
}

func TestMkdirInImageOtherErrors(t *testing.T) {
	tests := []struct {
		name    string
		image   []entry
		mount   string
		wantErr string
	}{
		{"regular file in the way", []entry{file("srv", "x", 0o644)}, "/srv/x", "/srv is in the way"},
		{"regular file as the mount point", []entry{file("data", "x", 0o644)}, "/data", "/data is in the way"},
		{"root itself", nil, "/", "not a clean absolute path"},
		{"dot-dot above the root", nil, "../x", "not a clean absolute path"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			makeTree(t, root, tt.image)
			err := mkdirInImage(root, tt.mount)
			require.Error(t, err)
			var sym *errSymlinkInImage
			assert.False(t, errors.As(err, &sym))
			assert.Contains(t, err.Error(), tt.wantErr)
		})
	}

	t.Run("root is a symlink", func(t *testing.T) {
		base := t.TempDir()
		require.NoError(t, os.Mkdir(filepath.Join(base, "real"), 0o755))
		require.NoError(t, os.Symlink("real", filepath.Join(base, "root")))
		err := mkdirInImage(filepath.Join(base, "root"), "/x")
		require.Error(t, err)
		assert.Contains(t, err.Error(), "open image")
		assert.NoDirExists(t, filepath.Join(base, "real", "x"))
	})
}

func TestFindShell(t *testing.T) {
	tests := []struct {
		name   string
		image  []entry
		want   string
		wantOK bool
	}{
		{"bash preferred over sh", []entry{file("bin/sh", "#!", 0o755), file("bin/bash", "#!", 0o755)}, "/bin/bash", true},
		{"usr/bin/bash preferred over bin/sh", []entry{file("bin/sh", "#!", 0o755), file("usr/bin/bash", "#!", 0o755)}, "/usr/bin/bash", true},
		{"merged usr", []entry{symlink("bin", "usr/bin"), file("usr/bin/bash", "#!", 0o755)}, "/bin/bash", true},
		{"sh via relative symlink to busybox", []entry{file("bin/busybox", "#!", 0o755), symlink("bin/sh", "busybox")}, "/bin/sh", true},
		{"sh via absolute symlink resolved in the image", []entry{file("bin/busybox", "#!", 0o755), symlink("bin/sh", "/bin/busybox")}, "/bin/sh", true},
		{"absolute target only inside the image", []entry{file("opt/bb/busybox", "#!", 0o755), symlink("bin/sh", "/opt/bb/busybox")}, "/bin/sh", true},
		// /usr/bin/env exists on the host, not in the image.
		{"absolute target only on the host", []entry{dirEntry("usr", 0o755), symlink("bin/sh", "/usr/bin/env")}, "", false},
		{"dot-dot target cannot escape", []entry{symlink("bin/sh", "../../../../../../../../../usr/bin/env")}, "", false},
		{"dot-dot target clamped to the root", []entry{file("usr/bin/env", "#!", 0o755), symlink("bin/sh", "../../../../../../../../../usr/bin/env")}, "/bin/sh", true},
		{"non-executable bash skipped", []entry{file("bin/bash", "#!", 0o644), file("bin/sh", "#!", 0o755)}, "/bin/sh", true},
		{"bash directory skipped", []entry{dirEntry("bin/bash", 0o755), file("usr/bin/sh", "#!", 0o755)}, "/usr/bin/sh", true},
		{"dangling sh", []entry{symlink("bin/sh", "busybox")}, "", false},
		{"symlink loop", []entry{symlink("bin/sh", "sh2"), symlink("bin/sh2", "sh")}, "", false},
		{"no shell", []entry{file("bin/ls", "#!", 0o755), file("bin/shell", "#!", 0o755)}, "", false},
		{"empty image", nil, "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			makeTree(t, root, tt.image)
			got, ok := findShell(root)
			assert.Equal(t, tt.wantOK, ok)
			assert.Equal(t, tt.want, got)
		})
	}
}

func TestResolveInImage(t *testing.T) {
	root := t.TempDir()
	makeTree(t, root, []entry{
		file("bin/busybox", "#!", 0o755),
		symlink("bin/sh", "/bin/busybox"),
		symlink("lib", "usr/lib"),
		dirEntry("usr/lib/x", 0o755),
		symlink("usr/lib/x/up", "../../.."),
		symlink("escape", "../../../.."),
		symlink("abs", "/"),
		symlink("loop", "loop"),
		symlink("etc", "/etc"),
	})
	tests := []struct {
		path   string
		want   string
		wantOK bool
	}{
		{"/bin/sh", "/bin/busybox", true},
		{"bin/sh", "/bin/busybox", true},
		{"/lib/x", "/usr/lib/x", true},
		{"/lib/x/up/bin/sh", "/bin/busybox", true},
		{"/escape/bin/busybox", "/bin/busybox", true},
		{"/escape/escape/bin", "/bin", true},
		{"/abs/bin/sh", "/bin/busybox", true},
		{"/../../bin/sh", "/bin/busybox", true},
		{"/", "/", true},
		{"/loop", "", false},
		{"/etc/passwd", "", false}, // /etc -> /etc, which the image lacks
		{"/escape/etc/hostname", "", false},
		{"/missing/x", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.path, func(t *testing.T) {
			got, ok := resolveInImage(root, tt.path)
			assert.Equal(t, tt.wantOK, ok)
			assert.Equal(t, tt.want, got)
		})
	}
	assert.True(t, executableInImage(root, "/escape/bin/sh"))
	assert.False(t, executableInImage(root, "/lib/x"), "a directory is not executable")
	assert.False(t, executableInImage(root, "/etc/passwd"))
}

// imageTree is an image directory with what copies must keep: modes,
// symlinks (dangling ones too), sticky and setgid directories, read-only
// directories.
func imageTree(t *testing.T, src string) {
	t.Helper()
	makeTree(t, src, []entry{
		file("bin/busybox", "busybox binary", 0o755),
		symlink("bin/sh", "busybox"),
		symlink("etc/mtab", "/proc/self/mounts"),
		symlink("dangling", "/no/such/file"),
		file("etc/passwd", "root:x:0:0::/root:/bin/sh\n", 0o644),
		file("etc/shadow", "root:*::", 0o400),
		dirEntry("tmp", fs.ModeSticky|0o777),
		dirEntry("srv/shared", fs.ModeSetgid|0o2775&0o777),
		dirEntry("empty", 0o755),
		file("ro/inner/f", "f", 0o444),
		file("ch/environment", "PATH=/bin\n", 0o644),
	})
	require.NoError(t, os.Chmod(filepath.Join(src, "ro/inner"), 0o555))
	require.NoError(t, os.Chmod(filepath.Join(src, "ro"), 0o500))
}

// imageFiles are imageTree's regular files.
var imageFiles = []string{"bin/busybox", "etc/passwd", "etc/shadow", "ro/inner/f", "ch/environment"}

// TestCloneTree: a copy for a job that may write to its image has the
// image's content, modes and symlinks, but no inode of it: writing to,
// or changing the mode of, a copied file leaves the original as it was.
func TestCloneTree(t *testing.T) {
	base := t.TempDir()
	src, dst := filepath.Join(base, "src"), filepath.Join(base, "dst")
	imageTree(t, src)
	require.NoError(t, cloneTree(src, dst))
	for _, f := range imageFiles {
		a, err := os.Lstat(filepath.Join(src, f))
		require.NoError(t, err)
		b, err := os.Lstat(filepath.Join(dst, f))
		require.NoError(t, err)
		assert.False(t, os.SameFile(a, b), "%s has an inode of its own", f)
		assert.Equal(t, a.Mode(), b.Mode(), f)
		assert.Equal(t, mechtest.ReadString(t, filepath.Join(src, f)), mechtest.ReadString(t, filepath.Join(dst, f)), f)
	}
	for f, target := range map[string]string{"bin/sh": "busybox", "etc/mtab": "/proc/self/mounts", "dangling": "/no/such/file"} {
		got, err := os.Readlink(filepath.Join(dst, f))
		require.NoError(t, err, f)
		assert.Equal(t, target, got)
	}
	fi, err := os.Lstat(filepath.Join(dst, "tmp"))
	require.NoError(t, err)
	assert.Equal(t, fs.ModeDir|fs.ModeSticky|0o777, fi.Mode())

	require.NoError(t, os.WriteFile(filepath.Join(dst, "etc/passwd"), []byte("changed\n"), 0o644))
	require.NoError(t, os.Chmod(filepath.Join(dst, "bin/busybox"), 0o700))
	assert.Equal(t, "root:x:0:0::/root:/bin/sh\n", mechtest.ReadString(t, filepath.Join(src, "etc/passwd")))
	fi, err = os.Stat(filepath.Join(src, "bin/busybox"))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o755), fi.Mode().Perm())

	require.Error(t, cloneTree(src, dst), "the destination must not exist yet")
}

// BenchmarkJobCopy measures the two ways of giving a job its copy of an
// image directory: hard links (the default) and files of its own (when
// ch-run -w is allowed). The tree has the shape of a small distribution
// image: 2,000 files averaging 8 KiB (16 MiB) in 200 directories. Set
// CI_EXEC_BENCH_DIR to measure another file system (a btrfs or XFS one
// has reflinks).
func BenchmarkJobCopy(b *testing.B) {
	base := os.Getenv("CI_EXEC_BENCH_DIR")
	if base == "" {
		base = b.TempDir()
	} else {
		var err error
		base, err = os.MkdirTemp(base, "bench-")
		require.NoError(b, err)
		b.Cleanup(func() { _ = removeTree(base) })
	}
	src := filepath.Join(base, "src")
	var size int64
	for d := 0; d < 200; d++ {
		dir := filepath.Join(src, fmt.Sprintf("usr/lib/d%03d", d))
		require.NoError(b, os.MkdirAll(dir, 0o755))
		for f := 0; f < 10; f++ {
			n := 1024 * (1 + (d*10+f)%15) // 1 to 15 KiB
			require.NoError(b, os.WriteFile(filepath.Join(dir, fmt.Sprintf("f%d.so", f)), make([]byte, n), 0o644))
			size += int64(n)
		}
	}
	for _, m := range []struct {
		name string
		copy func(src, dst string) error
	}{{"hard links", linkTree}, {"own files", cloneTree}} {
		b.Run(m.name, func(b *testing.B) {
			b.SetBytes(size)
			for i := 0; i < b.N; i++ {
				dst := filepath.Join(base, fmt.Sprintf("dst-%d", i))
				if err := m.copy(src, dst); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				if err := removeTree(dst); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
	}
}

func TestLinkTree(t *testing.T) {
	base := t.TempDir()
	src := filepath.Join(base, "src")
	dst := filepath.Join(base, "dst")
	imageTree(t, src)

	require.NoError(t, linkTree(src, dst))

	for _, f := range imageFiles {
		a, err := os.Lstat(filepath.Join(src, f))
		require.NoError(t, err)
		b, err := os.Lstat(filepath.Join(dst, f))
		require.NoError(t, err)
		assert.True(t, os.SameFile(a, b), "%s shares its inode", f)
		assert.Equal(t, a.Mode(), b.Mode(), f)
	}
	for f, target := range map[string]string{"bin/sh": "busybox", "etc/mtab": "/proc/self/mounts", "dangling": "/no/such/file"} {
		fi, err := os.Lstat(filepath.Join(dst, f))
		require.NoError(t, err)
		assert.Equal(t, fs.ModeSymlink, fi.Mode().Type(), "%s stays a symlink", f)
		got, err := os.Readlink(filepath.Join(dst, f))
		require.NoError(t, err)
		assert.Equal(t, target, got)
	}
	dirModes := map[string]fs.FileMode{
		".":          fs.ModeDir | 0o755,
		"tmp":        fs.ModeDir | fs.ModeSticky | 0o777,
		"srv/shared": fs.ModeDir | fs.ModeSetgid | 0o775,
		"empty":      fs.ModeDir | 0o755,
		"ro":         fs.ModeDir | 0o700, // 0500 made owner-writable
		"ro/inner":   fs.ModeDir | 0o755, // 0555 made owner-writable
	}
	for d, want := range dirModes {
		fi, err := os.Lstat(filepath.Join(dst, d))
		require.NoError(t, err)
		assert.Equal(t, want, fi.Mode(), "mode of %s", d)
		sfi, err := os.Lstat(filepath.Join(src, d))
		require.NoError(t, err)
		assert.False(t, os.SameFile(sfi, fi), "%s is a new directory", d)
	}

	// The copy shares no directory: a mount point added to it is not in src.
	require.NoError(t, mkdirInImage(dst, "/builds/ci"))
	assert.NoDirExists(t, filepath.Join(src, "builds"))

	// The copy survives a re-pull replacing the original.
	require.NoError(t, removeTree(src))
	got, err := os.ReadFile(filepath.Join(dst, "bin/busybox"))
	require.NoError(t, err)
	assert.Equal(t, "busybox binary", string(got))

	// The destination must not exist yet.
	require.Error(t, linkTree(dst, dst))
}

func TestCopyEntry(t *testing.T) {
	base := t.TempDir()
	makeTree(t, base, []entry{file("prog", "#!/bin/sh\necho hi\n", 0o750), symlink("link", "../x/y")})

	fi, err := os.Lstat(filepath.Join(base, "prog"))
	require.NoError(t, err)
	require.NoError(t, copyEntry(filepath.Join(base, "prog"), filepath.Join(base, "prog.copy"), fi))
	cfi, err := os.Lstat(filepath.Join(base, "prog.copy"))
	require.NoError(t, err)
	assert.False(t, os.SameFile(fi, cfi), "a copy, not a link")
	assert.Equal(t, os.FileMode(0o750), cfi.Mode())
	got, err := os.ReadFile(filepath.Join(base, "prog.copy"))
	require.NoError(t, err)
	assert.Equal(t, "#!/bin/sh\necho hi\n", string(got))
	// O_EXCL: an existing destination is not overwritten.
	assert.Error(t, copyEntry(filepath.Join(base, "prog"), filepath.Join(base, "prog.copy"), fi))

	fi, err = os.Lstat(filepath.Join(base, "link"))
	require.NoError(t, err)
	require.NoError(t, copyEntry(filepath.Join(base, "link"), filepath.Join(base, "link.copy"), fi))
	target, err := os.Readlink(filepath.Join(base, "link.copy"))
	require.NoError(t, err)
	assert.Equal(t, "../x/y", target)

	require.NoError(t, unix.Mkfifo(filepath.Join(base, "fifo"), 0o644))
	fi, err = os.Lstat(filepath.Join(base, "fifo"))
	require.NoError(t, err)
	require.NoError(t, copyEntry(filepath.Join(base, "fifo"), filepath.Join(base, "fifo.copy"), fi))
	_, err = os.Lstat(filepath.Join(base, "fifo.copy"))
	assert.ErrorIs(t, err, fs.ErrNotExist, "special files are skipped")
}

func TestRemoveTree(t *testing.T) {
	base := t.TempDir()
	tree := filepath.Join(base, "ci-exec-job+k")
	outside := filepath.Join(base, "outside")
	makeTree(t, outside, []entry{file("keep", "k", 0o644)})
	makeTree(t, tree, []entry{
		file("ro/a/f", "f", 0o444),
		file("ro/g", "g", 0o444),
		symlink("ro/l", outside),
		file("rw/h", "h", 0o644),
	})
	require.NoError(t, os.Chmod(filepath.Join(tree, "ro/a"), 0o555))
	require.NoError(t, os.Chmod(filepath.Join(tree, "ro"), 0o555))
	if os.Geteuid() == 0 {
		t.Log("running as root: the read-only directories do not stop the first RemoveAll")
	}

	require.NoError(t, removeTree(tree))
	assert.NoDirExists(t, tree)
	assert.DirExists(t, base)
	assert.FileExists(t, filepath.Join(outside, "keep"), "symlinks are removed, not followed")

	assert.NoError(t, removeTree(filepath.Join(base, "missing")))
}

func TestCheckStorage(t *testing.T) {
	tests := []struct {
		name     string
		setup    func(t *testing.T, parent, dir string)
		wantErr  string
		wantLeft bool // whether something is at dir afterwards
	}{
		{"missing dir", func(t *testing.T, parent, dir string) {}, "", false},
		{"empty dir removed", func(t *testing.T, parent, dir string) {
			require.NoError(t, os.Mkdir(dir, 0o700))
		}, "", false},
		{"initialised dir kept", func(t *testing.T, parent, dir string) {
			makeTree(t, dir, []entry{dirEntry("img", 0o755), file("version", "7\n", 0o644)})
		}, "", true},
		{"symlink refused", func(t *testing.T, parent, dir string) {
			require.NoError(t, os.Mkdir(filepath.Join(parent, "victim.ch"), 0o700))
			require.NoError(t, os.Symlink(filepath.Join(parent, "victim.ch"), dir))
		}, "not a directory", true},
		{"dangling symlink refused", func(t *testing.T, parent, dir string) {
			require.NoError(t, os.Symlink("/no/such/dir", dir))
		}, "not a directory", true},
		{"regular file refused", func(t *testing.T, parent, dir string) {
			require.NoError(t, os.WriteFile(dir, nil, 0o600))
		}, "not a directory", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			parent := t.TempDir()
			dir := filepath.Join(parent, "ciuser.ch")
			tt.setup(t, parent, dir)
			err := checkStorage(dir)
			if tt.wantErr == "" {
				require.NoError(t, err)
			} else {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tt.wantErr)
			}
			assert.Equal(t, tt.wantLeft, exists(dir))
			if tt.name == "symlink refused" {
				fi, err := os.Lstat(dir)
				require.NoError(t, err)
				assert.Equal(t, fs.ModeSymlink, fi.Mode().Type(), "the symlink is left alone")
				assert.DirExists(t, filepath.Join(parent, "victim.ch"))
			}
		})
	}

	t.Run("missing parent refused", func(t *testing.T) {
		parent := filepath.Join(t.TempDir(), "nope")
		err := checkStorage(filepath.Join(parent, "ciuser.ch"))
		require.Error(t, err)
		assert.Contains(t, err.Error(), "parent "+parent+" does not exist")
	})
	t.Run("parent is a file", func(t *testing.T) {
		parent := filepath.Join(t.TempDir(), "file")
		require.NoError(t, os.WriteFile(parent, nil, 0o600))
		err := checkStorage(filepath.Join(parent, "ciuser.ch"))
		require.Error(t, err)
		assert.Contains(t, err.Error(), "does not exist")
	})
	t.Run("someone else's dir refused", func(t *testing.T) {
		testenv.RequireRoot(t)
		dir := filepath.Join(t.TempDir(), "ciuser.ch")
		makeTree(t, dir, []entry{dirEntry("img", 0o755)})
		require.NoError(t, os.Chown(dir, 54321, 54321))
		err := checkStorage(dir)
		require.Error(t, err)
		assert.Contains(t, err.Error(), "belongs to uid 54321")
		assert.DirExists(t, filepath.Join(dir, "img"))
	})
}

func exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

func TestHasEnvironment(t *testing.T) {
	tests := []struct {
		name    string
		content *string
		want    bool
	}{
		{"missing", nil, false},
		{"empty", ptr(""), false},
		{"blank", ptr(" \n\n"), false},
		{"settings", ptr("PATH=/usr/local/bin:/usr/bin\n"), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			if tt.content != nil {
				makeTree(t, root, []entry{file("ch/environment", *tt.content, 0o644)})
			}
			assert.Equal(t, tt.want, hasEnvironment(root))
		})
	}
}

func ptr(s string) *string { return &s }

func TestLockStorage(t *testing.T) {
	t.Run("creates the lock file", func(t *testing.T) {
		storage := t.TempDir()
		l, err := lockStorage(storage, time.Now().Add(time.Second))
		require.NoError(t, err)
		l.Unlock()
		fi, err := os.Lstat(filepath.Join(storage, "lock"))
		require.NoError(t, err)
		assert.True(t, fi.Mode().IsRegular())
	})
	t.Run("symlink at the lock refused", func(t *testing.T) {
		storage := t.TempDir()
		victim := filepath.Join(t.TempDir(), "victim")
		require.NoError(t, os.Symlink(victim, filepath.Join(storage, "lock")))
		_, err := lockStorage(storage, time.Now().Add(time.Second))
		require.Error(t, err)
		assert.ErrorIs(t, err, syscall.ELOOP)
		assert.NoFileExists(t, victim)
	})
	t.Run("missing storage", func(t *testing.T) {
		_, err := lockStorage(filepath.Join(t.TempDir(), "nope"), time.Now().Add(time.Second))
		require.Error(t, err)
	})
	t.Run("waits for another process", func(t *testing.T) {
		storage := t.TempDir()
		cmd := exec.Command(os.Args[0])
		cmd.Env = append(os.Environ(), "CI_EXEC_TEST_HOLD_LOCK="+storage)
		hold, err := cmd.StdinPipe() // the holder waits on it: never written
		require.NoError(t, err)
		defer hold.Close()
		out, err := cmd.StdoutPipe()
		require.NoError(t, err)
		require.NoError(t, cmd.Start())
		t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
		line, err := bufio.NewReader(out).ReadString('\n')
		require.NoError(t, err)
		require.Equal(t, "locked\n", line)

		_, err = lockStorage(storage, time.Now().Add(300*time.Millisecond))
		require.Error(t, err)
		assert.Contains(t, err.Error(), "stayed locked")

		require.NoError(t, cmd.Process.Kill())
		_ = cmd.Wait()
		l, err := lockStorage(storage, time.Now().Add(5*time.Second))
		require.NoError(t, err)
		l.Unlock()
	})
}

// TestMain makes the test binary, started with CI_EXEC_TEST_HOLD_LOCK, the
// other process of TestLockStorage: it takes ch-image's storage lock and
// holds it until killed (or its stdin closes).
func TestMain(m *testing.M) {
	storage := os.Getenv("CI_EXEC_TEST_HOLD_LOCK")
	if storage == "" {
		os.Exit(m.Run())
	}
	l, err := lockStorage(storage, time.Now().Add(time.Second))
	if err != nil {
		os.Exit(3)
	}
	_ = l
	os.Stdout.WriteString("locked\n")
	_, _ = io.Copy(io.Discard, os.Stdin)
	os.Exit(0)
}
