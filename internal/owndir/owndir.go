// Package owndir checks directories that must belong to the job user: in
// a parent other users can write (a shared data_dir, /var/tmp), another
// user could plant the directory, or a symlink to their own, and read or
// replace what the job keeps there. Messages name the directory; callers
// add what the admin or user should do.
package owndir

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"syscall"
)

// ErrNotOwned is wrapped by errors for a directory of another user.
var ErrNotOwned = errors.New("not the job user's")

// Check returns an error unless dir is a real directory (not a symlink)
// owned by the calling user.
func Check(dir string) error {
	fi, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("check %s: %w", dir, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory (a symlink or file there is refused)", dir)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Getuid() {
		return fmt.Errorf("%s belongs to uid %d, not to the job user (uid %d): %w", dir, st.Uid, os.Getuid(), ErrNotOwned)
	}
	return nil
}

// Private creates dir 0700 when missing; an existing one must pass Check
// and is made 0700.
func Private(dir string) error {
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	if err := Check(dir); err != nil {
		return err
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("check %s: %w", dir, err)
	}
	if fi.Mode().Perm() != 0o700 {
		if err := os.Chmod(dir, 0o700); err != nil {
			return fmt.Errorf("chmod %s: %w", dir, err)
		}
	}
	return nil
}
