package mechtest

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/mechanism/kit"
	"github.com/ci-exec/ci-exec/internal/policy"
)

// Version is a row of a version parser's table: the name, the program's
// output and the version read from it ("" when the output is refused).
type Version [3]string

// Versions runs parse (a runtime's ParseVersion) on each row: the version
// is read, or the output is refused with "cannot read the version" and
// no version.
func Versions(t *testing.T, parse func(out string) (string, error), rows []Version) {
	for _, row := range rows {
		name, out, want := row[0], row[1], row[2]
		t.Run(name, func(t *testing.T) {
			got, err := parse(out)
			if want == "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), "cannot read the version")
				assert.Empty(t, got)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, want, got)
		})
	}
}

// CommandError is a spec that a runtime's Command refuses with an error
// that contains WantErr.
type CommandError struct {
	Name    string
	Spec    mechanism.RunSpec
	WantErr string
}

// SpecErrors are the specs every runtime's Command refuses
// (kit.CheckSpec): no command, no image. img is an image of the
// runtime, env and argv a valid environment and command.
func SpecErrors(img mechanism.Image, env, argv []string) []CommandError {
	noHandle := img
	noHandle.Handle = ""
	return []CommandError{
		{Name: "nil argv", Spec: mechanism.RunSpec{Image: img, Env: env}, WantErr: "no command"},
		{Name: "empty argv", Spec: mechanism.RunSpec{Image: img, Env: env, Argv: []string{}}, WantErr: "no command"},
		{Name: "empty handle", Spec: mechanism.RunSpec{Image: noHandle, Env: env, Argv: argv}, WantErr: "no image"},
	}
}

// CommandErrors runs command (a runtime's Command) on each case: it fails
// as the case says and returns neither argv nor environment.
func CommandErrors(t *testing.T, command func(mechanism.RunSpec) (argv, env []string, err error), cases []CommandError) {
	for _, tt := range cases {
		t.Run(tt.Name, func(t *testing.T) {
			a, e, err := command(tt.Spec)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.WantErr)
			assert.Nil(t, a)
			assert.Nil(t, e)
		})
	}
}

// Diagnosis is a failed run, its exit code and the tail of its stderr, and
// the runtime's own error message that Diagnose must find there ("" when
// the stage script, not the runtime, failed).
type Diagnosis struct {
	Name string
	Code int
	Tail string
	Want string
}

// Diagnoses runs diagnose (a runtime's Diagnose) on each case.
func Diagnoses(t *testing.T, diagnose func(exitCode int, stderrTail string) string, cases []Diagnosis) {
	for _, tt := range cases {
		t.Run(tt.Name, func(t *testing.T) {
			assert.Equal(t, tt.Want, diagnose(tt.Code, tt.Tail))
		})
	}
}

// DefaultUserArgs checks that every default user argument of r is in its
// run flag table and that none of dangerous is among them. It returns the
// table's flags, long and short, with the kind of their argument.
func DefaultUserArgs(t *testing.T, r mechanism.Runtime, dangerous []string) map[string]policy.ArgKind {
	t.Helper()
	known := map[string]policy.ArgKind{}
	for _, f := range r.RunFlags() {
		known[f.Long] = f.Arg
		if f.Short != "" {
			known[f.Short] = f.Arg
		}
	}
	for _, f := range r.DefaultUserArgs() {
		_, ok := known[f]
		assert.True(t, ok, "default user arg %s is not in the run flag table", f)
	}
	for _, bad := range dangerous {
		assert.NotContains(t, r.DefaultUserArgs(), bad)
	}
	return known
}

// StorageDirs checks where a runtime keeps the user's image storage,
// <image_storage_dir>/<name>, for the default image_storage_dir (/var/tmp),
// a configured one and one with a trailing slash: kit.StorageDir
// gives it, the runtime made by newRuntime uses it (storage reads it) and
// prep_script is told of it in envVar.
func StorageDirs[R mechanism.PrepEnver](t *testing.T, name, envVar string, newRuntime func(config.Mechanism, map[string]string) R, storage func(R) string) {
	tests := []struct{ test, dir, want string }{
		{"default under /var/tmp", "", "/var/tmp/" + name},
		{"configured", "/scratch/images", "/scratch/images/" + name},
		{"trailing slash", "/scratch/images/", "/scratch/images/" + name},
	}
	for _, tt := range tests {
		t.Run(tt.test, func(t *testing.T) {
			assert.Equal(t, tt.want, kit.StorageDir(tt.dir, name))
			r := newRuntime(config.Mechanism{ImageStorageDir: tt.dir}, nil)
			assert.Equal(t, tt.want, storage(r))
			assert.Equal(t, []string{envVar + "=" + tt.want}, r.PrepEnv())
		})
	}
}
