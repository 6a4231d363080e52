package kit

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// CgroupRoot is where the cgroup file system is mounted (a seam for tests).
var CgroupRoot = "/sys/fs/cgroup"

// CgroupLimits reports whether a runtime started by uid can put CPU and
// memory limits on its containers: the host must run cgroup v2 alone
// (unified mode), and for a user other than root the cpu and memory
// controllers must be delegated to that user's systemd manager, which is
// where rootless runtimes create their cgroups. When it cannot, why says
// what is missing. On cgroup v1 or hybrid hosts unprivileged limits are
// impossible, and ci-exec does not rely on root's v1 path either: a job's
// limits must mean the same for every user.
func CgroupLimits(uid int) (ok bool, why string) {
	ctl, err := os.ReadFile(filepath.Join(CgroupRoot, "cgroup.controllers"))
	if err != nil {
		return false, "the host does not run cgroup v2 in unified mode"
	}
	if !hasControllers(string(ctl)) {
		return false, "cgroup v2 lacks the cpu or memory controller"
	}
	if uid == 0 {
		return true, ""
	}
	p := filepath.Join(CgroupRoot, "user.slice", fmt.Sprintf("user-%d.slice", uid), fmt.Sprintf("user@%d.service", uid), "cgroup.controllers")
	del, err := os.ReadFile(p)
	if err != nil || !hasControllers(string(del)) {
		return false, fmt.Sprintf("the cpu and memory controllers are not delegated to uid %d (systemd user@.service Delegate=)", uid)
	}
	return true, ""
}

func hasControllers(list string) bool {
	have := map[string]bool{}
	for _, c := range strings.Fields(list) {
		have[c] = true
	}
	return have["cpu"] && have["memory"]
}
