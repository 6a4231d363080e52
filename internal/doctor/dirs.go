package doctor

import (
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/ci-exec/ci-exec/internal/config"
)

// Free-space thresholds for job and image dirs.
const (
	minFree  = 100 << 20 // below: jobs will fail
	warnFree = 1 << 30   // below: jobs may fail on a big image or build
)

// fsNames are the file systems ci-exec's checks care about, by statfs magic.
var fsNames = map[int64]string{
	unix.EXT4_SUPER_MAGIC: "ext4", unix.XFS_SUPER_MAGIC: "xfs", unix.BTRFS_SUPER_MAGIC: "btrfs",
	unix.TMPFS_MAGIC: "tmpfs", unix.NFS_SUPER_MAGIC: "nfs", unix.OVERLAYFS_SUPER_MAGIC: "overlay",
	0x0bd00bd0: "lustre", 0x47504653: "gpfs", 0x5346544e: "ntfs", unix.FUSE_SUPER_MAGIC: "fuse",
	0x2fc12fc1: "zfs", 0xf15f: "ecryptfs", 0x00c36400: "cephfs",
	unix.SMB_SUPER_MAGIC: "smb", 0xfe534d42: "smb2", unix.CIFS_SUPER_MAGIC: "cifs", 0x6a656a63: "fakeowner",
}

// networkFS are file systems other nodes can share (and that Charliecloud's
// storage directory should not be on).
var networkFS = map[string]bool{"nfs": true, "lustre": true, "gpfs": true, "cephfs": true, "smb": true, "smb2": true, "cifs": true}

type dirInfo struct {
	// existing is dir or its nearest existing ancestor.
	existing string
	exists   bool
	fi       os.FileInfo
	fsType   string
	free     uint64
}

func inspect(dir string) (dirInfo, error) {
	d := dirInfo{existing: filepath.Clean(dir)}
	for {
		fi, err := os.Lstat(d.existing)
		if err == nil {
			d.fi = fi
			break
		}
		if !os.IsNotExist(err) {
			return d, err
		}
		parent := filepath.Dir(d.existing)
		if parent == d.existing {
			return d, err
		}
		d.existing = parent
	}
	d.exists = d.existing == filepath.Clean(dir)
	var st unix.Statfs_t
	if err := unix.Statfs(d.existing, &st); err == nil {
		d.fsType = fsNames[int64(st.Type)]
		if d.fsType == "" {
			d.fsType = fmt.Sprintf("0x%x", st.Type)
		}
		d.free = st.Bavail * uint64(st.Bsize)
	}
	return d, nil
}

func owner(fi os.FileInfo) (uid uint32, ok bool) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, false
	}
	return st.Uid, true
}

func human(n uint64) string {
	switch {
	case n >= 1<<40:
		return fmt.Sprintf("%.1f TiB", float64(n)/(1<<40))
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	default:
		return fmt.Sprintf("%.0f MiB", float64(n)/(1<<20))
	}
}

// checkFree adds the free-space line of a dir.
func checkFree(r *Report, area, key string, d dirInfo) {
	switch {
	case d.free < minFree:
		r.add(Check{Area: area, Status: Fail, Key: key, Message: fmt.Sprintf("%s: only %s free on %s", key, human(d.free), d.existing),
			Fix: "free space there or point " + key + " at a bigger file system"})
	case d.free < warnFree:
		r.add(Check{Area: area, Status: Warn, Key: key, Message: fmt.Sprintf("%s: %s free on %s", key, human(d.free), d.existing),
			Fix: "large images or builds may not fit"})
	}
}

// checkDataDir checks data_dir: the job user's builds, cache, scripts
// and state dirs are made in it (owned by the user, 0700).
func checkDataDir(r *Report, cfg *config.Config) {
	const key = "general.data_dir"
	dir := cfg.General.DataDir
	if dir == "" || !filepath.IsAbs(dir) {
		return // the config check said so
	}
	d, err := inspect(dir)
	if err != nil {
		r.add(Check{Area: "data_dir", Status: Fail, Key: key, Message: fmt.Sprintf("%s: %v", dir, err),
			Fix: fmt.Sprintf("a parent directory is not searchable by %s: chmod o+x it, or choose a data_dir %s can reach", r.User, r.User)})
		return
	}
	uid := uint32(os.Getuid())
	switch {
	case d.exists && !d.fi.IsDir():
		r.add(Check{Area: "data_dir", Status: Fail, Key: key, Message: fmt.Sprintf("%s is not a directory", dir),
			Fix: "remove it or point " + key + " elsewhere"})
		return
	case d.exists:
		if o, ok := owner(d.fi); ok && o != uid {
			// The dirs below must be the user's: ci-exec refuses a
			// shared builds/ or scripts/ dir.
			if unix.Access(dir, unix.W_OK|unix.X_OK) != nil {
				r.add(Check{Area: "data_dir", Status: Fail, Key: key, Message: fmt.Sprintf("%s belongs to uid %d and is not writable by %s", dir, o, r.User),
					Fix: fmt.Sprintf("give every user their own data_dir (e.g. data_dir = \"/srv/ci/$USER\") or chown %s %s", r.User, dir)})
				return
			}
			r.add(Check{Area: "data_dir", Status: Warn, Key: key, Message: fmt.Sprintf("%s belongs to uid %d, not %s", dir, o, r.User),
				Fix: "use a per-user data_dir (with $USER in it) so users never share builds/ and scripts/"})
		}
		if perm := d.fi.Mode().Perm(); perm&0o022 != 0 && d.fi.Mode()&os.ModeSticky == 0 {
			r.add(Check{Area: "data_dir", Status: Fail, Key: key, Message: fmt.Sprintf("%s is writable by others (mode %04o)", dir, perm),
				Fix: "chmod go-w " + dir + " (another user could replace a job's dirs)"})
		}
		for _, top := range []string{"builds", "cache", "scripts", "state"} {
			sub := filepath.Join(dir, top)
			fi, err := os.Lstat(sub)
			if err != nil {
				continue
			}
			if o, ok := owner(fi); ok && o != uid || !fi.IsDir() {
				r.add(Check{Area: "data_dir", Status: Fail, Key: key, Message: fmt.Sprintf("%s is not a directory of %s", sub, r.User),
					Fix: "remove it (ci-exec recreates it) or give each user their own data_dir"})
			}
		}
	default:
		if unix.Access(d.existing, unix.W_OK|unix.X_OK) != nil {
			r.add(Check{Area: "data_dir", Status: Fail, Key: key, Message: fmt.Sprintf("%s does not exist and %s cannot create it in %s", dir, r.User, d.existing),
				Fix: fmt.Sprintf("create it: install -d -o %s -m 0700 %s", r.User, dir)})
			return
		}
	}
	state := "exists"
	if !d.exists {
		state = "will be created"
	}
	r.ok("data_dir", "%s %s (%s, %s free)", dir, state, d.fsType, human(d.free))
	checkFree(r, "data_dir", key, d)
	if cfg.IsBatch() && !networkFS[d.fsType] {
		r.add(Check{Area: "data_dir", Status: Warn, Key: key, Message: fmt.Sprintf("%s is on %s, a local file system", dir, d.fsType),
			Fix: "with executor = \"slurm\" the compute nodes must see data_dir: put it on a shared file system"})
	}
}

// checkStorage checks the runtime's image_storage_dir: it must exist (the
// per-user dirs are made inside it, so a missing one would be created by
// the first user's job and shut everyone else out) and let the user
// create or own their dir.
func checkStorage(r *Report, cfg *config.Config, m config.Mechanism, u config.UserInfo) {
	table := cfg.MechanismTable()
	key := table + ".image_storage_dir"
	dir := m.ImageStorageDir
	if dir == "" {
		if cfg.IsBatch() {
			dir = cfg.General.DataDir
		} else {
			dir = "/var/tmp"
		}
	}
	area := "storage"
	failsBefore := len(r.Checks)
	fi, err := os.Stat(dir)
	if err != nil || !fi.IsDir() {
		r.add(Check{Area: area, Status: Fail, Key: key, Message: fmt.Sprintf("%s = %q does not exist", key, dir),
			Fix: fmt.Sprintf("create it (install -d -m 1777 %s when users share it) or change %s", dir, key)})
		return
	}
	d, _ := inspect(dir)
	suffix := ".ch"
	if cfg.General.RunMechanism == config.MechanismApptainer {
		suffix = ".apptainer"
	}
	if n := cfg.General.TemplateName(); n != "" {
		suffix = ".tpl-" + n
	}
	for _, sub := range []string{u.Name + suffix, u.Name + ".ci-exec"} {
		p := filepath.Join(dir, sub)
		sfi, err := os.Lstat(p)
		switch {
		case err == nil:
			if o, ok := owner(sfi); ok && o != uint32(os.Getuid()) || !sfi.IsDir() {
				r.add(Check{Area: area, Status: Fail, Key: key, Message: fmt.Sprintf("%s is not a directory owned by %s", p, u.Name),
					Fix: "remove it: ci-exec refuses a user storage dir another user could have planted"})
			}
		case os.IsNotExist(err):
			if unix.Access(dir, unix.W_OK|unix.X_OK) != nil {
				r.add(Check{Area: area, Status: Fail, Key: key, Message: fmt.Sprintf("%s cannot create %s", u.Name, p),
					Fix: fmt.Sprintf("chmod 1777 %s, or create %s owned by %s (mode 0700)", dir, p, u.Name)})
			}
		}
	}
	if perm := fi.Mode().Perm(); perm&0o002 != 0 && fi.Mode()&os.ModeSticky == 0 {
		r.add(Check{Area: area, Status: Fail, Key: key, Message: fmt.Sprintf("%s is world-writable without the sticky bit (mode %04o)", dir, perm),
			Fix: "chmod +t " + dir + " (else any user can remove another's images)"})
	}
	if !r.failedSince(failsBefore) {
		r.ok(area, "%s %s (%s, %s free)", key, dir, d.fsType, human(d.free))
	}
	checkFree(r, area, key, d)
	if cfg.General.RunMechanism == config.MechanismCharliecloud && networkFS[d.fsType] {
		r.add(Check{Area: area, Status: Warn, Key: key, Message: fmt.Sprintf("%s is on %s", dir, d.fsType),
			Fix: "Charliecloud's storage directory should be on a local file system (ch-image needs its locking and xattrs); converted SquashFS files may be shared"})
	}
	if cfg.IsBatch() && !networkFS[d.fsType] && !m.DisableConvert {
		r.add(Check{Area: area, Status: Warn, Key: key, Message: fmt.Sprintf("%s is on %s, a local file system", dir, d.fsType),
			Fix: "with executor = \"slurm\" compute nodes read the converted images from here: put it on a shared file system"})
	}
	for _, k := range []struct{ key, val string }{{"cache_dir", m.CacheDir}, {"tmp_dir", m.TmpDir}} {
		if k.val == "" {
			continue
		}
		if fi, err := os.Stat(k.val); err != nil || !fi.IsDir() {
			r.add(Check{Area: area, Status: Fail, Key: table + "." + k.key, Message: fmt.Sprintf("%s.%s = %q does not exist", table, k.key, k.val),
				Fix: "create it (mode 1777 when users share it) or remove the key"})
		}
	}
}
