package mechanism

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
)

// EnsureUserDir makes dir, a per-user directory inside a parent the admin
// chose (often shared, like /var/tmp), safe to use: created 0700 when
// missing, and otherwise refused unless it is a real directory (not a
// symlink) owned by the calling user. Without this check another user could
// plant the directory, or a symlink to their own, and read or replace what
// the job writes there.
func EnsureUserDir(dir string) error {
	parent := filepath.Dir(dir)
	if fi, err := os.Stat(parent); err != nil || !fi.IsDir() {
		return fmt.Errorf("%s does not exist; the admin must create it (mode 1777 when users share it) or change the configuration", parent)
	}
	err := os.Mkdir(dir, 0o700)
	if err == nil || !errors.Is(err, fs.ErrExist) {
		return err
	}
	return CheckOwnDir(dir)
}

// CheckOwnDir returns an error unless dir is a directory (not a symlink)
// owned by the calling user.
func CheckOwnDir(dir string) error {
	fi, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("check %s: %w", dir, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory (a symlink or file there is refused); remove it", dir)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Getuid() {
		return fmt.Errorf("%s belongs to uid %d, not to the job user (uid %d); remove it", dir, st.Uid, os.Getuid())
	}
	return nil
}
