package policy

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/ci-exec/ci-exec/internal/failure"
)

// volumeTree makes a real directory tree with symlinks, because the policy
// is about what paths resolve to:
//
//	root/allowed/data/            an allowed source
//	root/allowed/link-out ->      root/secret (escapes the prefix)
//	root/allowed/link-in  ->      root/allowed/data
//	root/secret/
//	root/alias -> root/allowed    a prefix written through a symlink
func volumeTree(t *testing.T) string {
	t.Helper()
	root, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"allowed/data", "secret", "allowedx"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for link, target := range map[string]string{
		"allowed/link-out": filepath.Join(root, "secret"),
		"allowed/link-in":  filepath.Join(root, "allowed/data"),
		"alias":            filepath.Join(root, "allowed"),
	} {
		if err := os.Symlink(target, filepath.Join(root, link)); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func TestUserVolumes(t *testing.T) {
	root := volumeTree(t)
	p := VolumePolicy{Variable: "CH_VOLUMES", Prefixes: []string{root + "/allowed"}, ReadOnlySupported: true}
	vars := map[string]string{
		"CH_VOLUMES_10": root + "/allowed/data:/ten",
		"CH_VOLUMES_0":  root + "/allowed/data",
		"CH_VOLUMES_1":  root + "/allowed/data:/data:ro",
		"CH_VOLUMES_2":  root + "/allowed/link-in:/in:rw",
		"CH_VOLUMES_X":  "ignored: not a number",
		"OTHER_0":       "/ignored",
	}
	got, err := p.UserVolumes(vars)
	if err != nil {
		t.Fatal(err)
	}
	data := root + "/allowed/data"
	want := []Bind{
		{Src: data, Dst: data},
		{Src: data, Dst: "/data", ReadOnly: true},
		{Src: data, Dst: "/in"},
		{Src: data, Dst: "/ten"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v\nwant %+v", got, want)
	}

	// A prefix given through a symlink is resolved too.
	p.Prefixes = []string{root + "/alias"}
	if _, err := p.UserVolumes(map[string]string{"CH_VOLUMES_0": root + "/allowed/data:/d"}); err != nil {
		t.Fatalf("prefix through a symlink: %v", err)
	}
}

func TestUserVolumesRefused(t *testing.T) {
	root := volumeTree(t)
	p := VolumePolicy{Variable: "CH_VOLUMES", Prefixes: []string{root + "/allowed"}, ReadOnlySupported: true}
	tests := map[string]struct {
		value string
		want  string
	}{
		"outside the prefixes":    {"/etc", "not under an allowed volume prefix"},
		"symlink escape":          {root + "/allowed/link-out:/s", "resolves to " + root + "/secret"},
		"dot-dot escape":          {root + "/allowed/../secret:/s", "not under an allowed volume prefix"},
		"sibling with the prefix": {root + "/allowedx:/s", "not under an allowed volume prefix"},
		"missing source":          {root + "/allowed/nope:/s", "does not exist"},
		"relative source":         {"allowed/data:/s", "absolute host path"},
		"empty source":            {":/s", "absolute host path"},
		"relative destination":    {root + "/allowed/data:data", "clean absolute path"},
		"unclean destination":     {root + "/allowed/data:/a/../etc", "clean absolute path"},
		"trailing slash":          {root + "/allowed/data:/a/", "clean absolute path"},
		"root destination":        {root + "/allowed/data:/", "clean absolute path"},
		"under /proc":             {root + "/allowed/data:/proc/x", "/proc, /sys or /dev"},
		"too many colons":         {root + "/allowed/data:/a:/b:ro", "SRC[:DST][:ro]"},
		"bad mode":                {root + "/allowed/data:/a:rx", "SRC[:DST][:ro]"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			_, err := p.UserVolumes(map[string]string{"CH_VOLUMES_3": tc.value})
			if err == nil {
				t.Fatalf("%q accepted", tc.value)
			}
			if failure.ClassOf(err) != failure.User || !strings.Contains(err.Error(), tc.want) || !strings.HasPrefix(err.Error(), "CH_VOLUMES_3=") {
				t.Fatalf("got %v, want a user error naming CH_VOLUMES_3 with %q", err, tc.want)
			}
		})
	}

	t.Run("no prefixes configured", func(t *testing.T) {
		// Jacamar binds any user volume; ci-exec refuses them, naming both
		// keys and the fix (docs/config.md, "Moving from Jacamar").
		_, err := VolumePolicy{Table: "general.charliecloud", Variable: "CH_VOLUMES"}.UserVolumes(map[string]string{"CH_VOLUMES_0": root + "/allowed/data"})
		if err == nil || failure.ClassOf(err) != failure.User {
			t.Fatalf("got %v, want a user error", err)
		}
		for _, w := range []string{"CH_VOLUMES_0: ", "general.charliecloud.user_volume_variable is set but general.charliecloud.volume_prefixes is empty",
			"remove the CH_VOLUMES_* variables", "list the host directories volumes may come from in volume_prefixes"} {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%v does not say %q", err, w)
			}
		}
	})
	t.Run("read-only unsupported", func(t *testing.T) {
		q := p
		q.ReadOnlySupported = false
		_, err := q.UserVolumes(map[string]string{"CH_VOLUMES_0": root + "/allowed/data:/d:ro"})
		if err == nil || !strings.Contains(err.Error(), "read-only") {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("volumes disabled", func(t *testing.T) {
		got, err := VolumePolicy{}.UserVolumes(map[string]string{"CH_VOLUMES_0": "/etc"})
		if err != nil || got != nil {
			t.Fatalf("without user_volume_variable the variables must be ignored: %v %v", got, err)
		}
	})
}
