package downscope

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/ci-exec/ci-exec/internal/atomicfile"
	"github.com/ci-exec/ci-exec/internal/authz"
)

// stateRoot is auth.state_dir: the runner account's own dir for what
// steers a job's later stages. Whoever can write a dir can rename what is
// in it, so neither it nor any dir above it may be writable by anyone but
// root and the runner's account (a sticky world-writable dir such as /tmp
// is still refused: its entries can be pre-created by anyone).
type stateRoot string

func openStateRoot(dir string) (stateRoot, error) {
	dir = filepath.Clean(dir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("auth.state_dir: %v", err)
	}
	me := uint32(os.Geteuid())
	for d := dir; ; d = filepath.Dir(d) {
		fi, err := os.Stat(d)
		if err != nil {
			return "", fmt.Errorf("auth.state_dir: %v", err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		if st.Uid != 0 && st.Uid != me {
			return "", fmt.Errorf("auth.state_dir %s: %s belongs to uid %d; it and every dir above it must belong to root or the runner's account", dir, d, st.Uid)
		}
		if fi.Mode().Perm()&0o022 != 0 {
			return "", fmt.Errorf("auth.state_dir %s: %s is writable by group or others (mode %s); use a dir only root and the runner's account can write, e.g. /var/lib/ci-exec/state", dir, d, fi.Mode().Perm())
		}
		if d == "/" {
			break
		}
	}
	fi, _ := os.Stat(dir)
	if fi.Sys().(*syscall.Stat_t).Uid != me {
		return "", fmt.Errorf("auth.state_dir %s must belong to the runner's account (uid %d)", dir, me)
	}
	if fi.Mode().Perm() != 0o700 {
		if err := os.Chmod(dir, 0o700); err != nil {
			return "", fmt.Errorf("auth.state_dir: %v", err)
		}
	}
	return stateRoot(dir), nil
}

// jobDir is one job's dir, named by the id from the runner's trusted
// JOB_RESPONSE_FILE (never a job variable: CI_JOB_ID can be overridden).
func (r stateRoot) jobDir(id int64) string {
	return filepath.Join(string(r), "jobs", strconv.FormatInt(id, 10))
}

func (r stateRoot) jwksCache() string { return filepath.Join(string(r), "jwks-cache.json") }

func (r stateRoot) write(id int64, name string, b []byte) error {
	dir := r.jobDir(id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(dir, name), b, 0o600)
}

func (r stateRoot) read(id int64, name string) ([]byte, error) {
	return os.ReadFile(filepath.Join(r.jobDir(id), name))
}

func (r stateRoot) remove(id int64) error { return os.RemoveAll(r.jobDir(id)) }

// staleAge is when a job's state is surely abandoned (its cleanup never
// came: a crashed runner or host): longer than any GitLab job may run.
const staleAge = 31 * 24 * time.Hour

// sweep removes job states older than staleAge, so that a runner that
// lost jobs does not fill state_dir. It runs in the config stage.
func (r stateRoot) sweep(now time.Time) {
	jobs := filepath.Join(string(r), "jobs")
	ents, err := os.ReadDir(jobs)
	if err != nil {
		return
	}
	for _, e := range ents {
		if fi, err := e.Info(); err == nil && now.Sub(fi.ModTime()) > staleAge {
			_ = os.RemoveAll(filepath.Join(jobs, e.Name()))
		}
	}
}

// ensureDataDir makes the job user's data_dir exist and belong to them.
//
// The front creates it only where the user cannot: in a dir that belongs
// to root or the runner's account (e.g. data_dir = "/srv/ci/$USER"), as
// the new dir's only root act, then hands it over (chown through a
// descriptor, so a swapped-in link is never followed). In a dir the user
// owns ($HOME/.ci-exec) the user's own stage creates it: a privileged
// process must not create or chown anything in a tree the user controls.
func ensureDataDir(dir string, a *authz.Account, p privilege) error {
	dir = filepath.Clean(dir)
	fi, err := os.Lstat(dir)
	if err == nil {
		st := fi.Sys().(*syscall.Stat_t)
		switch {
		case !fi.IsDir():
			return fmt.Errorf("data_dir %s of %s is not a directory (%s); remove it", dir, a.Name, fi.Mode().Type())
		case int(st.Uid) != a.UID:
			return fmt.Errorf("data_dir %s of %s belongs to uid %d: give it to the user (chown %s) or remove it", dir, a.Name, st.Uid, a.Name)
		}
		return nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("data_dir of %s: %v", a.Name, err)
	}
	parent := filepath.Dir(dir)
	pfi, err := os.Stat(parent)
	if err != nil {
		return fmt.Errorf("data_dir %s of %s: its parent %v; create %s (owned by root, mode 0755) first", dir, a.Name, err, parent)
	}
	owner := int(pfi.Sys().(*syscall.Stat_t).Uid)
	if owner == a.UID {
		return nil // the user's stage creates it
	}
	if owner != 0 && owner != os.Geteuid() {
		return fmt.Errorf("data_dir %s of %s: its parent %s belongs to uid %d, neither the user nor root; data_dir must be under a dir of root's or the user's", dir, a.Name, parent, owner)
	}
	if !p.chown {
		return fmt.Errorf("data_dir %s of %s does not exist and ci-exec cannot create it for the user without CAP_CHOWN: create it (owned by the user, mode 0700) or use `%s`", dir, a.Name, SetcapLine)
	}
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("create data_dir %s of %s: %v", dir, a.Name, err)
	}
	fd, err := syscall.Open(dir, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open data_dir %s of %s: %v", dir, a.Name, err)
	}
	defer syscall.Close(fd)
	var st syscall.Stat_t
	if err := syscall.Fstat(fd, &st); err != nil {
		return fmt.Errorf("data_dir %s: %v", dir, err)
	}
	if int(st.Uid) == a.UID {
		return nil // a concurrent job of the user made it
	}
	if err := syscall.Fchown(fd, a.UID, a.GID); err != nil {
		return fmt.Errorf("give data_dir %s to %s: %v", dir, a.Name, err)
	}
	return syscall.Fchmod(fd, 0o700)
}
