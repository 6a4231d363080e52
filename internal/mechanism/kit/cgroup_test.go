package kit

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestCgroupLimits(t *testing.T) {
	write := func(root, rel, content string) {
		p := filepath.Join(root, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	old := CgroupRoot
	t.Cleanup(func() { CgroupRoot = old })

	CgroupRoot = t.TempDir() // v1 or hybrid: no cgroup.controllers
	ok, why := CgroupLimits(0)
	assert.False(t, ok)
	assert.Contains(t, why, "cgroup v2")

	CgroupRoot = t.TempDir()
	write(CgroupRoot, "cgroup.controllers", "cpuset cpu io memory pids\n")
	ok, _ = CgroupLimits(0)
	assert.True(t, ok, "root on cgroup v2")
	ok, why = CgroupLimits(1001)
	assert.False(t, ok, "nothing delegated to the user")
	assert.Contains(t, why, "uid 1001")
	write(CgroupRoot, "user.slice/user-1001.slice/user@1001.service/cgroup.controllers", "memory pids\n")
	ok, _ = CgroupLimits(1001)
	assert.False(t, ok, "memory alone is not enough")
	write(CgroupRoot, "user.slice/user-1001.slice/user@1001.service/cgroup.controllers", "cpu memory pids\n")
	ok, _ = CgroupLimits(1001)
	assert.True(t, ok)
}
