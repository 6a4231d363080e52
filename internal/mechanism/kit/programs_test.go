package kit

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/failure"
)

func TestOneLine(t *testing.T) {
	assert.Equal(t, "a b c", OneLine("  a\n b\t\tc \n"))
	long := OneLine(strings.Repeat("x", 400))
	assert.Len(t, long, 303)
	assert.True(t, strings.HasSuffix(long, "..."))
}

func writeProgram(t *testing.T, path string, mode os.FileMode) {
	t.Helper()
	require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
	require.NoError(t, os.WriteFile(path, []byte("#!/bin/sh\n"), mode))
	require.NoError(t, os.Chmod(path, mode))
}

func TestFindProgram(t *testing.T) {
	a, b := t.TempDir(), t.TempDir()
	writeProgram(t, filepath.Join(a, "noexec"), 0o644)
	writeProgram(t, filepath.Join(b, "noexec"), 0o755)
	require.NoError(t, os.Mkdir(filepath.Join(a, "isdir"), 0o755))
	writeProgram(t, filepath.Join(a, "both"), 0o755)
	writeProgram(t, filepath.Join(b, "both"), 0o755)
	tests := []struct {
		name   string
		prog   string
		want   string
		wantOK bool
	}{
		{"not executable in first dir", "noexec", filepath.Join(b, "noexec"), true},
		{"first dir wins", "both", filepath.Join(a, "both"), true},
		{"directory is not a program", "isdir", "", false},
		{"missing", "ch-run", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := findProgram([]string{a, b}, tt.prog)
			assert.Equal(t, tt.wantOK, ok)
			assert.Equal(t, tt.want, got)
		})
	}
}

func TestProgramDirs(t *testing.T) {
	assert.Equal(t, []string{"/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"}, ProgramDirs(""))
	assert.Equal(t, []string{"/opt/ch/bin"}, ProgramDirs("/opt/ch/bin"))
}

func TestFindPrograms(t *testing.T) {
	app := t.TempDir()
	writeProgram(t, filepath.Join(app, "run"), 0o755)
	writeProgram(t, filepath.Join(app, "extra"), 0o755)
	got, err := FindPrograms("rt", app, []string{"run"}, []string{"extra", "absent"})
	require.NoError(t, err)
	assert.Equal(t, map[string]string{"run": filepath.Join(app, "run"), "extra": filepath.Join(app, "extra")}, got)

	_, err = FindPrograms("rt", app, []string{"run", "absent"}, nil)
	require.Error(t, err)
	assert.Equal(t, failure.System, failure.ClassOf(err))
	assert.Contains(t, err.Error(), "absent not found in "+app)
	assert.Contains(t, err.Error(), "general.rt.application_path")

	// The program itself, as Jacamar's Podman table takes it: the error
	// says which directory to write.
	_, err = FindPrograms("rt", filepath.Join(app, "run"), []string{"run"}, nil)
	require.Error(t, err)
	assert.Equal(t, failure.System, failure.ClassOf(err))
	assert.Contains(t, err.Error(), "general.rt.application_path is the directory of the rt programs, not a program: set it to "+app+" instead of "+filepath.Join(app, "run"))
}

func TestEnsureUserDir(t *testing.T) {
	base := t.TempDir()
	dir := filepath.Join(base, "me")
	require.NoError(t, EnsureUserDir(dir))
	fi, err := os.Stat(dir)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o700), fi.Mode().Perm())
	require.NoError(t, EnsureUserDir(dir), "an existing own dir is fine")

	target := t.TempDir()
	link := filepath.Join(base, "link")
	require.NoError(t, os.Symlink(target, link))
	assert.ErrorContains(t, EnsureUserDir(link), "symlink")

	file := filepath.Join(base, "file")
	require.NoError(t, os.WriteFile(file, nil, 0o600))
	assert.ErrorContains(t, EnsureUserDir(file), "not a directory")

	assert.ErrorContains(t, EnsureUserDir(filepath.Join(base, "missing", "me")), "does not exist")

	if os.Getuid() == 0 {
		other := filepath.Join(base, "other")
		require.NoError(t, os.Mkdir(other, 0o700))
		require.NoError(t, os.Chown(other, 4242, 4242))
		assert.ErrorContains(t, EnsureUserDir(other), "belongs to uid 4242")
	}
}
