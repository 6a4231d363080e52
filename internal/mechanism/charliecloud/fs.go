package charliecloud

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ci-exec/ci-exec/internal/imagecache"
	"github.com/ci-exec/ci-exec/internal/mechanism/kit"
)

// forPath is ch-image's storage name for a reference: "/" becomes "%" and
// ":" becomes "+" (127.0.0.1:5443/ci/tiny:latest is stored in
// img/127.0.0.1+5443%ci%tiny+latest).
func forPath(ref string) string {
	return strings.NewReplacer("/", "%", ":", "+").Replace(ref)
}

// checkStorage makes sure the user's storage directory is theirs before
// ch-image trusts it: in a shared parent such as /var/tmp another user
// could otherwise plant /var/tmp/<victim>.ch (or a symlink) and control the
// victim's images. An empty directory is removed, because ch-image refuses
// to initialise one ("storage directory seems invalid").
func checkStorage(dir string) error {
	parent := filepath.Dir(dir)
	if fi, err := os.Stat(parent); err != nil || !fi.IsDir() {
		return fmt.Errorf("the image storage parent %s does not exist; the admin must create it (mode 1777 when users share it) or change general.charliecloud.image_storage_dir", parent)
	}
	if _, err := os.Lstat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err := kit.CheckOwnDir(dir); err != nil {
		return fmt.Errorf("image storage: %w", err)
	}
	if ents, err := os.ReadDir(dir); err == nil && len(ents) == 0 {
		_ = os.Remove(dir)
	}
	return nil
}

// storageLock holds ch-image's own storage lock (a POSIX record lock on
// STORAGE/lock, as ch-image takes with fcntl.lockf), so that no ch-image
// re-pulls an image while a job copy is being made from it.
type storageLock struct{ f *os.File }

// lockStorage waits for the storage lock until deadline.
func lockStorage(storage string, deadline time.Time) (*storageLock, error) {
	f, err := os.OpenFile(filepath.Join(storage, "lock"), os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open the storage lock: %w", err)
	}
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: io.SeekStart}
	for delay := 50 * time.Millisecond; ; {
		err := unix.FcntlFlock(f.Fd(), unix.F_SETLK, &lk)
		if err == nil {
			return &storageLock{f: f}, nil
		}
		if !errors.Is(err, unix.EAGAIN) && !errors.Is(err, unix.EACCES) {
			f.Close()
			return nil, imagecache.LockError("image storage "+storage, "lock", err)
		}
		if time.Now().After(deadline) {
			f.Close()
			return nil, errors.New("the image storage stayed locked by another ch-image too long")
		}
		time.Sleep(delay)
		delay = min(2*delay, 2*time.Second)
	}
}

func (l *storageLock) Unlock() { l.f.Close() } // closing drops POSIX locks

// linkTree makes dst a copy of the image directory src whose files are
// hard links to src's: it costs one directory entry per file, shares no
// directory with src (so mount points can be added), and survives
// ch-image replacing src later, because ch-image never rewrites a file in
// place. Directories are made owner-writable so that Release can remove
// the copy. The copy's files ARE src's files: use it only where nothing
// writes to them (ch-run mounts the image read-only unless -w is given,
// and ch-convert only reads); else cloneTree.
func linkTree(src, dst string) error {
	return copyTree(src, dst, func(p, target string, info fs.FileInfo) error {
		if err := os.Link(p, target); err == nil {
			return nil
		}
		// Hard links can be refused (fs.protected_hardlinks on a file the
		// user does not own, a file system without them): copy instead.
		return copyEntry(p, target, info)
	})
}

// cloneTree makes dst a copy of src that shares no inode with it, so that
// a job that writes to its image (ch-run -w) cannot change src: each file
// is a reflink (FICLONE: copy-on-write, near free on btrfs, XFS and other
// file systems that share extents) or else copied by the kernel
// (copy_file_range).
func cloneTree(src, dst string) error {
	return copyTree(src, dst, copyEntry)
}

// copyTree recreates src's directories in dst and hands every other entry
// to file.
func copyTree(src, dst string, file func(src, dst string, info fs.FileInfo) error) error {
	return filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		info, err := d.Info()
		if err != nil {
			return err
		}
		if d.IsDir() {
			if err := os.Mkdir(target, 0o700); err != nil {
				return err
			}
			// Chmod, not Mkdir's mode: the umask must not change the image,
			// and sticky/setgid bits (/tmp is 1777) must survive.
			return os.Chmod(target, info.Mode()&(fs.ModePerm|fs.ModeSticky|fs.ModeSetgid)|0o700)
		}
		return file(p, target, info)
	})
}

// copyEntry copies one non-directory entry into a new inode: a regular
// file as a reflink where the file system has them, else by content.
func copyEntry(src, dst string, info fs.FileInfo) error {
	switch {
	case info.Mode()&fs.ModeSymlink != 0:
		target, err := os.Readlink(src)
		if err != nil {
			return err
		}
		return os.Symlink(target, dst)
	case info.Mode().IsRegular():
		in, err := os.Open(src)
		if err != nil {
			return err
		}
		defer in.Close()
		out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, info.Mode().Perm())
		if err != nil {
			return err
		}
		if err := unix.IoctlFileClone(int(out.Fd()), int(in.Fd())); err != nil {
			// No reflinks here (ext4, NFS, Lustre, another file system):
			// io.Copy between files uses copy_file_range, which copies in
			// the kernel (or on the NFS server).
			if _, err := io.Copy(out, in); err != nil {
				out.Close()
				return err
			}
		}
		if err := out.Close(); err != nil {
			return err
		}
		return os.Chmod(dst, info.Mode()&(fs.ModePerm|fs.ModeSetuid|fs.ModeSetgid|fs.ModeSticky))
	default:
		// Devices, fifos and sockets are not in pulled images (ch-image
		// drops them); skip rather than fail on an odd one.
		return nil
	}
}

// removeTree removes a job copy, making its directories writable first
// (an image can contain read-only directories).
func removeTree(dir string) error {
	err := os.RemoveAll(dir)
	if err == nil {
		return nil
	}
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			_ = os.Chmod(p, 0o700)
		}
		return nil
	})
	return os.RemoveAll(dir)
}

// errSymlinkInImage is returned when a mount point would have to be made
// through a symlink of the image.
type errSymlinkInImage struct{ path, component, target string }

func (e *errSymlinkInImage) Error() string {
	return fmt.Sprintf("the image has a symlink at %s (-> %s), where ci-exec must create the mount point %s; binds would follow it out of the image",
		e.component, e.target, e.path)
}

// mkdirInImage creates the directory path (absolute, as seen in the
// container) inside the image root, component by component, without ever
// following a symlink: an image can contain "srv -> /home/victim", and a
// path resolved on the host would then leave the image. Existing
// directories are kept; a symlink or a non-directory in the way is an error.
func mkdirInImage(root, path string) error {
	fd, err := unix.Open(root, unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open image %s: %w", root, err)
	}
	walked := ""
	for _, c := range strings.Split(strings.Trim(filepath.Clean(path), "/"), "/") {
		if c == "" || c == "." || c == ".." {
			unix.Close(fd)
			return fmt.Errorf("mount point %s is not a clean absolute path", path)
		}
		walked += "/" + c
		next, err := unix.Openat(fd, c, unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if errors.Is(err, unix.ENOENT) {
			if err := unix.Mkdirat(fd, c, 0o755); err != nil && !errors.Is(err, unix.EEXIST) {
				unix.Close(fd)
				return fmt.Errorf("create mount point %s in the image: %w", walked, err)
			}
			next, err = unix.Openat(fd, c, unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_RDONLY|unix.O_CLOEXEC, 0)
		}
		if err != nil {
			var st unix.Stat_t
			if unix.Fstatat(fd, c, &st, unix.AT_SYMLINK_NOFOLLOW) == nil && st.Mode&unix.S_IFMT == unix.S_IFLNK {
				target, _ := os.Readlink(filepath.Join(root, walked))
				unix.Close(fd)
				return &errSymlinkInImage{path: path, component: walked, target: target}
			}
			unix.Close(fd)
			return fmt.Errorf("create mount point %s in the image: %s is in the way (%v)", path, walked, err)
		}
		unix.Close(fd)
		fd = next
	}
	unix.Close(fd)
	return nil
}

// maxLinks bounds symlink resolution inside an image, as the kernel does.
const maxLinks = 40

// executableInImage reports whether path, resolved inside the image root
// the way the container will see it, is an executable regular file.
func executableInImage(root, path string) bool {
	p, ok := resolveInImage(root, path)
	if !ok {
		return false
	}
	fi, err := os.Lstat(filepath.Join(root, p))
	return err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0
}

// resolveInImage returns path with every symlink resolved inside root:
// absolute targets are taken relative to root, and ".." never climbs above
// it, as in the container.
func resolveInImage(root, path string) (string, bool) {
	todo := strings.Split(strings.Trim(path, "/"), "/")
	resolved := "/"
	for links := 0; len(todo) > 0; {
		c := todo[0]
		todo = todo[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			resolved = filepath.Dir(resolved)
			continue
		}
		next := filepath.Join(resolved, c)
		fi, err := os.Lstat(filepath.Join(root, next))
		if err != nil {
			return "", false
		}
		if fi.Mode()&fs.ModeSymlink == 0 {
			resolved = next
			continue
		}
		if links++; links > maxLinks {
			return "", false
		}
		target, err := os.Readlink(filepath.Join(root, next))
		if err != nil {
			return "", false
		}
		if strings.HasPrefix(target, "/") {
			resolved = "/"
		}
		todo = append(strings.Split(strings.Trim(target, "/"), "/"), todo...)
	}
	return resolved, true
}

// findShell picks the shell for stage scripts: bash when the image has it
// (the runner writes its scripts for bash), else a POSIX sh, which the
// runner's scripts also support (busybox and alpine images).
func findShell(root string) (string, bool) {
	for _, sh := range []string{"/bin/bash", "/usr/bin/bash", "/bin/sh", "/usr/bin/sh"} {
		if executableInImage(root, sh) {
			return sh, true
		}
	}
	return "", false
}

// hasEnvironment reports whether the image's ch/environment (its ENV
// settings, which ch-run --set-env loads) sets anything.
func hasEnvironment(root string) bool {
	b, err := os.ReadFile(filepath.Join(root, "ch", "environment"))
	return err == nil && strings.TrimSpace(string(b)) != ""
}
