// Package atomicfile replaces files so that a reader (another stage, a
// concurrent job) sees the old content or the new, never a mix, and so
// that after a crash the file is not left empty or half-written: the
// content goes to a temporary file in the same directory, which is
// fsynced, renamed over the target, and the directory is fsynced so the
// rename itself is on disk. Without the first fsync, ext4 and XFS may
// persist the rename before the data (a zero-length file after a power
// loss); without the second, the rename may be lost.
package atomicfile

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
)

// syncFile is (*os.File).Sync; the tests count its calls.
var syncFile = (*os.File).Sync

// Option changes how a file is written.
type Option int

const (
	// Volatile keeps the replacement atomic but skips both fsyncs: for
	// files a crash makes useless anyway (a stage's copy of its script),
	// where two syncs per write would only add latency, which on NFS is a
	// round trip to the server each.
	Volatile Option = iota + 1
)

// Write replaces path with data, mode perm (exactly, whatever the umask).
func Write(path string, data []byte, perm fs.FileMode, opts ...Option) error {
	return WriteFrom(path, bytes.NewReader(data), perm, opts...)
}

// WriteFrom replaces path with what r holds, mode perm.
func WriteFrom(path string, r io.Reader, perm fs.FileMode, opts ...Option) (err error) {
	durable := !has(opts, Volatile)
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	tmp, err := os.CreateTemp(dir, "."+base+".*.tmp")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer func() {
		if err != nil {
			_ = os.Remove(tmp.Name())
		}
	}()
	_, err = io.Copy(tmp, r)
	if err == nil {
		err = tmp.Chmod(perm)
	}
	if err == nil && durable {
		err = syncFile(tmp)
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if durable {
		if err := SyncDir(dir); err != nil {
			return fmt.Errorf("write %s: %w", path, err)
		}
	}
	return nil
}

// Publish renames src, a complete file or directory that a program wrote
// (a pulled image), to dst in the same file system, durably: src is
// fsynced first (a directory is not walked; its builder syncs what it
// wrote), then dst's directory after the rename.
func Publish(src, dst string) error {
	f, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("publish %s: %w", dst, err)
	}
	err = syncFile(f)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("publish %s: sync %s: %w", dst, src, err)
	}
	if err := os.Rename(src, dst); err != nil {
		return fmt.Errorf("publish %s: %w", dst, err)
	}
	if err := SyncDir(filepath.Dir(dst)); err != nil {
		return fmt.Errorf("publish %s: %w", dst, err)
	}
	return nil
}

// SyncDir fsyncs a directory, making the entries created, renamed or
// removed in it durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = syncFile(d)
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if errors.Is(err, syscall.EINVAL) {
		// The file system cannot sync directories (some FUSE ones): its
		// renames are as durable as it makes them.
		return nil
	}
	if err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	return nil
}

func has(opts []Option, o Option) bool {
	for _, x := range opts {
		if x == o {
			return true
		}
	}
	return false
}
