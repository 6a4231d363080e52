package charliecloud

import (
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/mechanism"
)

func TestConvertArgv(t *testing.T) {
	info := mechanism.Info{Programs: map[string]string{"ch-convert": "/usr/bin/ch-convert"}}
	tests := []struct {
		name    string
		cfg     config.Mechanism
		info    mechanism.Info
		want    []string
		wantTmp string
	}{
		{"default tmp", config.Mechanism{}, info,
			[]string{"/usr/bin/ch-convert", "-i", "ch-image", "-o", "squash", "ci-exec-job:j42-build", "/builds/scripts/j42-build.sqfs"}, ""},
		{"tmp_dir", config.Mechanism{TmpDir: "/scratch/tmp"}, info,
			[]string{"/usr/bin/ch-convert", "-i", "ch-image", "-o", "squash", "--tmp", "/scratch/tmp/ciuser",
				"ci-exec-job:j42-build", "/builds/scripts/j42-build.sqfs"}, "/scratch/tmp/ciuser"},
		{"program unknown", config.Mechanism{}, mechanism.Info{},
			[]string{"ch-convert", "-i", "ch-image", "-o", "squash", "ci-exec-job:j42-build", "/builds/scripts/j42-build.sqfs"}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newRuntime(tt.cfg, nil)
			assert.Equal(t, tt.want, r.convertArgv(tt.info, "ci-exec-job:j42-build", "/builds/scripts/j42-build.sqfs"))
			assert.Equal(t, tt.wantTmp, r.convertTmp())
		})
	}
}

func TestConvertLeavesNonStorageImages(t *testing.T) {
	r := newRuntime(config.Mechanism{}, nil)
	img := mechanism.Image{Handle: "/x/y.sqfs", Format: FormatSquash, Private: []string{"/x/y.sqfs"}}
	// No probe happens: a squashfs image is returned as it is.
	got, err := r.Convert(t.Context(), img, mechanism.ConvertRequest{})
	assert.NoError(t, err)
	assert.Equal(t, img, got)
}
