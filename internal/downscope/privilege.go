package downscope

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Linux capability numbers (linux/capability.h).
const (
	capChown  = 0
	capSetgid = 6
	capSetuid = 7
)

// privilege is what the front may do.
type privilege struct {
	root  bool
	chown bool
}

// effectiveCaps reads the effective capability set from /proc/self/status.
func effectiveCaps() (uint64, error) {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "CapEff:"); ok {
			return strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		}
	}
	return 0, fmt.Errorf("no CapEff in /proc/self/status")
}

// SetcapLine is the deployment without root (docs/multi-tenant.md).
const SetcapLine = "setcap cap_setuid,cap_setgid,cap_chown+ep /usr/local/sbin/ci-exec-auth"

// checkPrivilege makes sure the front can switch to the job user, and,
// when it has that power through file capabilities rather than as root,
// that no one but the runner's account can execute it: a binary with
// CAP_SETUID that every user can run, with an environment they choose,
// would let anyone run a stage of another user's job as that user.
func checkPrivilege() (privilege, error) {
	if os.Geteuid() == 0 {
		return privilege{root: true, chown: true}, nil
	}
	caps, err := effectiveCaps()
	if err != nil {
		return privilege{}, fmt.Errorf("auth.downscope = \"setuid\": read capabilities: %v", err)
	}
	has := func(c int) bool { return caps&(1<<c) != 0 }
	if !has(capSetuid) || !has(capSetgid) {
		return privilege{}, fmt.Errorf("auth.downscope = \"setuid\" needs root or CAP_SETUID and CAP_SETGID, and ci-exec runs as uid %d without them: run gitlab-runner as root, or `%s` (see docs/multi-tenant.md)", os.Getuid(), SetcapLine)
	}
	exe, err := os.Executable()
	if err != nil {
		return privilege{}, fmt.Errorf("auth.downscope = \"setuid\": find own executable: %v", err)
	}
	fi, err := os.Stat(exe)
	if err != nil {
		return privilege{}, fmt.Errorf("auth.downscope = \"setuid\": %v", err)
	}
	if fi.Mode().Perm()&0o007 != 0 {
		return privilege{}, fmt.Errorf("%s has capabilities but other users may run it (mode %s): chown root:<runner group> and chmod 0750 it (see docs/multi-tenant.md)", exe, fi.Mode().Perm())
	}
	return privilege{chown: has(capChown)}, nil
}
