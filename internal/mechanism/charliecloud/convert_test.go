package charliecloud

import (
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/imagecache"
	"github.com/ci-exec/ci-exec/internal/mechanism"
)

func TestConvertArgv(t *testing.T) {
	info := mechanism.Info{Programs: map[string]string{"ch-convert": "/usr/bin/ch-convert"}}
	const dir, out = "/var/tmp/ciuser.ci-exec/charliecloud/tmp/k.sqfs.7.tmp.d", "/var/tmp/ciuser.ci-exec/charliecloud/tmp/k.sqfs.7.tmp"
	tests := []struct {
		name    string
		cfg     config.Mechanism
		info    mechanism.Info
		want    []string
		wantTmp string
	}{
		{"default tmp", config.Mechanism{}, info,
			[]string{"/usr/bin/ch-convert", "-i", "dir", "-o", "squash", dir, out}, ""},
		{"tmp_dir", config.Mechanism{TmpDir: "/scratch/tmp"}, info,
			[]string{"/usr/bin/ch-convert", "-i", "dir", "-o", "squash", "--tmp", "/scratch/tmp/ciuser", dir, out}, "/scratch/tmp/ciuser"},
		{"program unknown", config.Mechanism{}, mechanism.Info{},
			[]string{"ch-convert", "-i", "dir", "-o", "squash", dir, out}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newRuntime(tt.cfg, nil)
			assert.Equal(t, tt.want, r.convertArgv(tt.info, dir, out))
			assert.Equal(t, tt.wantTmp, r.convertTmp())
		})
	}
}

func TestSquashKey(t *testing.T) {
	d1 := "sha256:" + strings.Repeat("ab", 32)
	d2 := "sha256:" + strings.Repeat("cd", 32)
	mounts := []string{"/builds/ci", "/scratch/data"}
	key := squashKey(d1, mounts)
	assert.Regexp(t, regexp.MustCompile(`^sha256-`+strings.Repeat("ab", 32)+`-[0-9a-f]{12}\.sqfs$`), key)
	assert.NoError(t, imagecache.CheckKey(key), "a valid store key")

	assert.Equal(t, key, squashKey(d1, []string{"/scratch/data", "/builds/ci"}), "the order does not matter")
	reversed := []string{"/scratch/data", "/builds/ci"}
	squashKey(d1, reversed)
	assert.Equal(t, []string{"/scratch/data", "/builds/ci"}, reversed, "the caller's slice is not sorted in place")

	others := map[string]string{
		"other digest":        squashKey(d2, mounts),
		"fewer mounts":        squashKey(d1, mounts[:1]),
		"more mounts":         squashKey(d1, append(append([]string(nil), mounts...), "/x")),
		"no mounts":           squashKey(d1, nil),
		"other mount":         squashKey(d1, []string{"/builds/ci", "/scratch/other"}),
		"prefix of the mount": squashKey(d1, []string{"/builds", "/scratch/data"}),
	}
	seen := map[string]string{key: "base"}
	for name, k := range others {
		if prev, ok := seen[k]; ok {
			t.Errorf("%s and %s share the key %s", name, prev, k)
		}
		seen[k] = name
	}
}
