package kit

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/ci-exec/ci-exec/internal/owndir"
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
	if err := owndir.Check(dir); err != nil {
		return fmt.Errorf("%w; remove it", err)
	}
	return nil
}
