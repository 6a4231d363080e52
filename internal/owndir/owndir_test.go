package owndir

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestPrivate(t *testing.T) {
	base := t.TempDir()
	dir := filepath.Join(base, "mine")
	require.NoError(t, Private(dir))
	require.NoError(t, os.Chmod(dir, 0o777))
	require.NoError(t, Private(dir), "an existing own dir is fine")
	fi, err := os.Stat(dir)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o700), fi.Mode().Perm(), "and closed to others")

	link := filepath.Join(base, "link")
	require.NoError(t, os.Symlink(t.TempDir(), link))
	assert.ErrorContains(t, Private(link), "a symlink or file there is refused")
	file := filepath.Join(base, "file")
	require.NoError(t, os.WriteFile(file, nil, 0o600))
	assert.ErrorContains(t, Check(file), "is not a directory")
	assert.Error(t, Check(filepath.Join(base, "missing")))

	if os.Getuid() == 0 {
		other := filepath.Join(base, "other")
		require.NoError(t, os.Mkdir(other, 0o700))
		require.NoError(t, os.Chown(other, 4242, 4242))
		err := Private(other)
		assert.ErrorContains(t, err, "belongs to uid 4242")
		assert.True(t, errors.Is(err, ErrNotOwned))
	}
}
