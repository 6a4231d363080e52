package charliecloud

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/mechanism/mechtest"
	"github.com/ci-exec/ci-exec/internal/policy"
)

func TestStorageDir(t *testing.T) {
	mechtest.StorageDirs(t, testUser+".ch", "CH_IMAGE_STORAGE", newRuntime, func(r *Runtime) string { return r.Storage })
}

func TestRuntimeIdentity(t *testing.T) {
	r := newRuntime(config.Mechanism{}, nil)
	assert.Equal(t, "charliecloud", r.Name())
	assert.Equal(t, "JACAMAR_CI_CHARLIECLOUD_ARGS", r.UserArgsVariable())
	names := r.CredentialVariables()
	assert.Equal(t, "CH_IMAGE_USERNAME", names.Username)
	assert.Equal(t, "CH_IMAGE_PASSWORD", names.Password)
}

// TestDefaultUserArgsAreSafe checks that every default user flag is known
// to the run flag table and that none of the flags that mount, write,
// change identity or pick another storage is among them.
func TestDefaultUserArgsAreSafe(t *testing.T) {
	mechtest.DefaultUserArgs(t, newRuntime(config.Mechanism{}, nil), []string{"--bind", "-b", "--write", "-w", "--write-fake", "-W",
		"--uid", "-u", "--gid", "-g", "--storage", "-s", "--mount", "-m", "--unsafe", "--join", "--home"})
}

func TestCommand(t *testing.T) {
	const storage = "/scratch/ciuser.ch"
	env := []string{"CI_JOB_ID=7", "HOME=/home/ciuser", "USER=ciuser"}
	info031 := mechanism.Info{Version: "0.31", Programs: map[string]string{"ch-run": "/usr/bin/ch-run"}, Features: map[string]bool{FeatureWriteFake: false}}
	info038 := mechanism.Info{Version: "0.38", Programs: map[string]string{"ch-run": "/opt/ch/bin/ch-run"}, Features: map[string]bool{FeatureWriteFake: true}}
	storageImg := mechanism.Image{Handle: "ci-exec-job:j42-build", Format: FormatStorage, Shell: "/bin/bash", RunOptions: []string{"--set-env"}}
	squashImg := mechanism.Image{Handle: "/builds/scripts/j42-build.sqfs", Format: FormatSquash, Shell: "/bin/sh",
		RunOptions: []string{"--mount=/builds/scripts/j42-build.mnt", "--set-env"}}
	binds := []policy.Bind{
		policy.SamePath("/builds/ci"),
		policy.SamePath("/builds/scripts"),
		{Src: "/data/shared", Dst: "/data"},
	}
	argv := []string{"/bin/bash", "/builds/scripts/step_script"}

	tests := []struct {
		name string
		info mechanism.Info
		spec mechanism.RunSpec
		want []string
	}{
		{
			name: "storage image, 0.31, full order",
			info: info031,
			spec: mechanism.RunSpec{
				Image: storageImg, Binds: binds, Workdir: "/builds/ci", Env: env,
				AdminOptions: []string{"--unset-env=FOO"}, UserArgs: []string{"--private-tmp", "--cd=/tmp"}, Argv: argv,
			},
			want: []string{"/usr/bin/ch-run", "-s", storage,
				"--bind=/builds/ci:/builds/ci", "--bind=/builds/scripts:/builds/scripts", "--bind=/data/shared:/data",
				"--private-tmp", "--cd=/builds/ci", "--set-env", "--unset-env=FOO", "--private-tmp", "--cd=/tmp",
				"ci-exec-job:j42-build", "--", "/bin/bash", "/builds/scripts/step_script"},
		},
		{
			name: "squashfs image has no -s and keeps its --mount",
			info: info031,
			spec: mechanism.RunSpec{Image: squashImg, Binds: binds[:1], Workdir: "/builds/ci", Env: env, Argv: []string{"/bin/sh", "/builds/scripts/s"}},
			want: []string{"/usr/bin/ch-run", "--bind=/builds/ci:/builds/ci", "--private-tmp", "--cd=/builds/ci",
				"--mount=/builds/scripts/j42-build.mnt", "--set-env",
				"/builds/scripts/j42-build.sqfs", "--", "/bin/sh", "/builds/scripts/s"},
		},
		{
			name: "write-fake feature on",
			info: info038,
			spec: mechanism.RunSpec{Image: storageImg, Binds: binds[:1], Env: env, Argv: argv},
			want: []string{"/opt/ch/bin/ch-run", "-s", storage, "--write-fake", "--bind=/builds/ci:/builds/ci",
				"--private-tmp", "--set-env", "ci-exec-job:j42-build", "--", "/bin/bash", "/builds/scripts/step_script"},
		},
		{
			name: "a bind at /tmp (the view's skeleton) replaces --private-tmp",
			info: info031,
			spec: mechanism.RunSpec{Image: squashImg, Binds: []policy.Bind{{Src: "/state/view/0", Dst: "/tmp"}, policy.SamePath("/tmp/ci/builds")},
				Env: env, Argv: []string{"/bin/sh", "/s"}},
			want: []string{"/usr/bin/ch-run", "--bind=/state/view/0:/tmp", "--bind=/tmp/ci/builds:/tmp/ci/builds",
				"--mount=/builds/scripts/j42-build.mnt", "--set-env", "/builds/scripts/j42-build.sqfs", "--", "/bin/sh", "/s"},
		},
		{
			name: "no binds, no workdir, no programs known",
			info: mechanism.Info{},
			spec: mechanism.RunSpec{Image: mechanism.Image{Handle: "/x/y.sqfs", Format: FormatSquash}, Env: env, Argv: []string{"/bin/sh"}},
			want: []string{"ch-run", "--private-tmp", "/x/y.sqfs", "--", "/bin/sh"},
		},
		{
			name: "user args that look like the handle or -- stay before the real handle",
			info: info031,
			spec: mechanism.RunSpec{Image: squashImg, Env: env, UserArgs: []string{"--verbose"}, Argv: []string{"/bin/sh", "-c", "--"}},
			want: []string{"/usr/bin/ch-run", "--private-tmp", "--mount=/builds/scripts/j42-build.mnt", "--set-env", "--verbose",
				"/builds/scripts/j42-build.sqfs", "--", "/bin/sh", "-c", "--"},
		},
	}
	r := newRuntime(config.Mechanism{ImageStorageDir: "/scratch"}, map[string]string{"SECRET": "host"})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			spec := tt.spec
			spec.Info = tt.info
			gotArgv, gotEnv, err := r.Command(spec)
			require.NoError(t, err)
			assert.Equal(t, tt.want, gotArgv)
			assert.Equal(t, env, gotEnv, "the environment is exactly the spec's")
		})
	}
}

func TestCommandEnvIsACopy(t *testing.T) {
	r := newRuntime(config.Mechanism{}, nil)
	spec := mechanism.RunSpec{Image: mechanism.Image{Handle: "h", Format: FormatSquash}, Env: []string{"USER=ciuser", "A=1"}, Argv: []string{"/bin/sh"}}
	_, env, err := r.Command(spec)
	require.NoError(t, err)
	env[1] = "A=changed"
	assert.Equal(t, "A=1", spec.Env[1])
}

func TestCommandErrors(t *testing.T) {
	img := mechanism.Image{Handle: "ci-exec-job:k", Format: FormatStorage}
	env := []string{"USER=ciuser"}
	argv := []string{"/bin/sh", "script"}
	tests := []mechtest.CommandError{
		{Name: "colon in bind source", Spec: mechanism.RunSpec{Image: img, Env: env, Argv: argv,
			Binds: []policy.Bind{{Src: "/data/a:b", Dst: "/data"}}}, WantErr: "':'"},
		{Name: "colon in bind destination", Spec: mechanism.RunSpec{Image: img, Env: env, Argv: argv,
			Binds: []policy.Bind{{Src: "/data", Dst: "/mnt/a:b"}}}, WantErr: "':'"},
		{Name: "read-only bind", Spec: mechanism.RunSpec{Image: img, Env: env, Argv: argv,
			Binds: []policy.Bind{policy.SamePath("/builds"), {Src: "/data", Dst: "/data", ReadOnly: true}}}, WantErr: "read-only"},
		{Name: "no USER", Spec: mechanism.RunSpec{Image: img, Env: []string{"HOME=/home/ciuser", "USERNAME=ciuser"}, Argv: argv}, WantErr: "USER"},
		{Name: "nil env", Spec: mechanism.RunSpec{Image: img, Argv: argv}, WantErr: "USER"},
	}
	mechtest.CommandErrors(t, newRuntime(config.Mechanism{}, nil).Command, append(tests, mechtest.SpecErrors(img, env, argv)...))
}

func TestDiagnose(t *testing.T) {
	const chErr = "ch-run[123]: error: can't mkdir: /var/tmp/ciuser.ch/img/x/builds: Read-only file system (ch_misc.c:409 30)"
	mechtest.Diagnoses(t, newRuntime(config.Mechanism{}, nil).Diagnose, []mechtest.Diagnosis{
		{Name: "ch-run error on exit 1", Code: 1, Tail: "some output\n" + chErr + "\n", Want: chErr},
		{Name: "ch-run error without trailing newline", Code: 1, Tail: chErr, Want: chErr},
		{Name: "last ch-run error wins", Code: 1, Tail: "ch-run[9]: error: first (ch_core.c:1 2)\n" + chErr + "\n", Want: chErr},
		{Name: "ch-run warning is not an error", Code: 1, Tail: "ch-run[123]: warning: something (ch_misc.c:1 0)\n"},
		{Name: "indented line is the script's", Code: 1, Tail: "  ch-run[123]: error: quoted by the script\n"},
		{Name: "exit 3 is the script's", Code: 3, Tail: chErr + "\n"},
		{Name: "exit 0", Code: 0, Tail: chErr},
		{Name: "exit 1 without ch-run line", Code: 1, Tail: "make: *** [all] Error 1\n"},
		{Name: "exit 1 empty tail", Code: 1, Tail: ""},
	})
}
