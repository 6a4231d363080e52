package apptainer

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/mechanism/mechtest"
	"github.com/ci-exec/ci-exec/internal/policy"
)

func TestIdentityAndStorage(t *testing.T) {
	mechtest.StorageDirs(t, jobUser+".apptainer", "CI_EXEC_APPTAINER_STORAGE", runtimeFor, func(r *Runtime) string { return r.Storage })
	r := runtimeFor(config.Mechanism{}, nil)
	assert.Equal(t, "apptainer", r.Name())
	assert.Equal(t, "JACAMAR_CI_APPTAINER_ARGS", r.UserArgsVariable())
	assert.Equal(t, "APPTAINER_DOCKER_USERNAME", r.CredentialVariables().Username)
	assert.Equal(t, "APPTAINER_DOCKER_PASSWORD", r.CredentialVariables().Password)
}

// TestDefaultUserArgs checks that the default user flags are all exec
// options and that none mounts host paths, changes identity or privileges,
// reaches a registry or writes into the image.
func TestDefaultUserArgs(t *testing.T) {
	dangerous := []string{"--bind", "-B", "--mount", "--fusemount", "--overlay", "-o", "--writable", "-w", "--fakeroot", "-f",
		"--home", "-H", "--workdir", "-W", "--scratch", "-S", "--allow-setuid", "--keep-privs", "--add-caps", "--security",
		"--userns", "-u", "--docker-login", "--docker-username", "--docker-password", "--authfile", "--env-file",
		"--app", "--containlibs", "--netns-path", "--network", "--device", "--tmpdir", "--no-https", "--nohttps"}
	known := mechtest.DefaultUserArgs(t, runtimeFor(config.Mechanism{}, nil), dangerous)
	// Every option that takes a value must be declared so: a value-taking
	// flag declared NoArg would let its value pass as the image.
	for _, long := range []string{"--bind", "--env", "--pwd", "--overlay", "--home", "--mount", "--security"} {
		assert.Equal(t, policy.RequiredArg, known[long], long)
	}
}

func TestCommandArgv(t *testing.T) {
	sysInfo := mechanism.Info{Version: "1.5.3", Programs: map[string]string{"apptainer": "/usr/bin/apptainer"}}
	appInfo := mechanism.Info{Version: "1.5.3", Programs: map[string]string{"apptainer": "/opt/apptainer/bin/apptainer"}}
	sif := mechanism.Image{Handle: "/builds/scripts/j42-abc.sif", Format: FormatSIF, Shell: "/bin/bash"}
	sifWithOpts := sif
	sifWithOpts.RunOptions = []string{"--underlay"}
	binds := []policy.Bind{
		policy.SamePath("/builds/ci"),
		policy.SamePath("/builds/scripts"),
		{Src: "/data/ref", Dst: "/ref", ReadOnly: true},
	}
	script := []string{"/bin/bash", "/builds/scripts/step_script"}
	env := []string{"CI_JOB_ID=7", "USER=ciuser"}

	tests := []struct {
		name string
		spec mechanism.RunSpec
		want []string
	}{
		{
			name: "everything, in order",
			spec: mechanism.RunSpec{Info: sysInfo, Image: sifWithOpts, Binds: binds, Workdir: "/builds/ci", Env: env,
				AdminOptions: []string{"--nv", "--no-home"}, UserArgs: []string{"--env=A=1", "--pid"}, Argv: script},
			want: []string{"/usr/bin/apptainer", "exec", "--cleanenv", "--contain", "--pid", "--no-privs",
				"--bind=/builds/ci:/builds/ci", "--bind=/builds/scripts:/builds/scripts", "--bind=/data/ref:/ref:ro",
				"--pwd=/builds/ci", "--underlay", "--nv", "--no-home", "--env=A=1", "--pid",
				"/builds/scripts/j42-abc.sif", "/bin/bash", "/builds/scripts/step_script"},
		},
		{
			name: "application_path program, one bind",
			spec: mechanism.RunSpec{Info: appInfo, Image: sif, Binds: binds[:1], Workdir: "/builds/ci", Env: env, Argv: script},
			want: []string{"/opt/apptainer/bin/apptainer", "exec", "--cleanenv", "--contain", "--pid", "--no-privs", "--bind=/builds/ci:/builds/ci", "--pwd=/builds/ci",
				"/builds/scripts/j42-abc.sif", "/bin/bash", "/builds/scripts/step_script"},
		},
		{
			name: "no binds, no workdir, program unknown",
			spec: mechanism.RunSpec{Image: sif, Argv: []string{"/bin/sh"}},
			want: []string{"apptainer", "exec", "--cleanenv", "--contain", "--pid", "--no-privs", "/builds/scripts/j42-abc.sif", "/bin/sh"},
		},
		{
			name: "option-like words after the image stay the command's",
			spec: mechanism.RunSpec{Info: sysInfo, Image: sif, UserArgs: []string{"--contain"},
				Argv: []string{"/bin/sh", "-c", "--bind=/:/host"}},
			want: []string{"/usr/bin/apptainer", "exec", "--cleanenv", "--contain", "--pid", "--no-privs", "--contain", "/builds/scripts/j42-abc.sif",
				"/bin/sh", "-c", "--bind=/:/host"},
		},
		{
			// No GPU on the machines this was written on: what a GPU job
			// runs is checked here, argument by argument.
			name: "GPU and limits (issue 15)",
			spec: mechanism.RunSpec{Info: sysInfo, Image: sif, Binds: binds[:1], Workdir: "/builds/ci", Env: env, Argv: script,
				AdminOptions: []string{"--no-home"}, GPU: true, Limits: mechanism.Limits{CPUs: 4, MemoryBytes: 2 << 30}},
			want: []string{"/usr/bin/apptainer", "exec", "--cleanenv", "--contain", "--pid", "--no-privs", "--bind=/builds/ci:/builds/ci",
				"--pwd=/builds/ci", "--nv", "--cpus=4", "--memory=2147483648", "--no-home",
				"/builds/scripts/j42-abc.sif", "/bin/bash", "/builds/scripts/step_script"},
		},
		{
			name: "service with its own command",
			spec: mechanism.RunSpec{Info: sysInfo, Image: sif, Workdir: "/", Env: env, Service: true, Argv: []string{"httpd", "-f", "-p", "8080"}},
			want: []string{"/usr/bin/apptainer", "exec", "--cleanenv", "--contain", "--pid", "--no-privs", "--pwd=/",
				"/builds/scripts/j42-abc.sif", "httpd", "-f", "-p", "8080"},
		},
		{
			name: "service with the image's entrypoint: its runscript",
			spec: mechanism.RunSpec{Info: sysInfo, Image: sif, Workdir: "/", Env: env, Service: true, ImageEntrypoint: true, Argv: []string{"-c", "fsync=off"}},
			want: []string{"/usr/bin/apptainer", "run", "--cleanenv", "--contain", "--pid", "--no-privs", "--pwd=/",
				"/builds/scripts/j42-abc.sif", "-c", "fsync=off"},
		},
		{
			name: "service with the image's entrypoint and command",
			spec: mechanism.RunSpec{Info: sysInfo, Image: sif, Env: env, Service: true, ImageEntrypoint: true},
			want: []string{"/usr/bin/apptainer", "run", "--cleanenv", "--contain", "--pid", "--no-privs", "/builds/scripts/j42-abc.sif"},
		},
	}
	r := runtimeFor(config.Mechanism{}, hostileHostEnv)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			argv, _, err := r.Command(tt.spec)
			require.NoError(t, err)
			assert.Equal(t, tt.want, argv)
			for _, a := range argv {
				assert.NotContains(t, a, "CI_JOB_ID", "container variables never travel on the command line")
			}
		})
	}
}

func TestCommandEnv(t *testing.T) {
	spec := mechanism.RunSpec{
		Image: mechanism.Image{Handle: "/job/j42-abc.sif", Format: FormatSIF},
		Env: []string{
			"CI_JOB_ID=7",
			"EMPTY=",
			"EQUALS=a=b=c",
			"HOME=/home/ciuser",
			"HOMEDIR=/x",
			"LD_PRELOAD=/job/own.so",
			"PATH=/usr/local/bin:/usr/bin",
			"PATHS=p",
			"SECRET_TOKEN=s3cr3t value",
			"USER=ciuser",
		},
		Argv: []string{"/bin/sh", "/builds/scripts/step_script"},
	}
	containerVars := []string{
		"APPTAINERENV_CI_JOB_ID=7",
		"APPTAINERENV_EMPTY=",
		"APPTAINERENV_EQUALS=a=b=c",
		"APPTAINERENV_HOMEDIR=/x",
		"APPTAINERENV_LD_PRELOAD=/job/own.so",
		"APPTAINERENV_PATHS=p",
		"APPTAINERENV_SECRET_TOKEN=s3cr3t value",
		"APPTAINERENV_USER=ciuser",
	}
	own := func(path string) []string {
		return []string{"PATH=" + path, "HOME=/home/ciuser", "USER=ciuser", "LOGNAME=ciuser", "LANG=C.UTF-8"}
	}
	tests := []struct {
		name    string
		cfg     config.Mechanism
		hostEnv map[string]string
		env     []string
		want    []string
	}{
		{"system path, hostile host", config.Mechanism{}, hostileHostEnv, spec.Env,
			append(own(toolPath), containerVars...)},
		{"application_path first", config.Mechanism{ApplicationPath: "/opt/apptainer/bin"}, hostileHostEnv, spec.Env,
			append(own("/opt/apptainer/bin:"+toolPath), containerVars...)},
		{"no container variables", config.Mechanism{}, nil, nil, own(toolPath)},
		{"only HOME and PATH", config.Mechanism{}, nil, []string{"HOME=/elsewhere", "PATH=/bin"}, own(toolPath)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := spec
			s.Env = tt.env
			_, env, err := runtimeFor(tt.cfg, tt.hostEnv).Command(s)
			require.NoError(t, err)
			assert.Equal(t, tt.want, env)
			for _, kv := range env {
				for _, p := range forbiddenEnvPrefixes {
					assert.False(t, strings.HasPrefix(kv, p), "host variable %s reached apptainer", kv)
				}
				assert.False(t, strings.HasPrefix(kv, "APPTAINER_"), "apptainer setting %s in a run", kv)
				assert.False(t, strings.HasPrefix(kv, "APPTAINERENV_HOME="), kv)
				assert.False(t, strings.HasPrefix(kv, "APPTAINERENV_PATH="), kv)
			}
		})
	}
}

func TestCommandErrors(t *testing.T) {
	sif := mechanism.Image{Handle: "/job/j42-abc.sif", Format: FormatSIF}
	argv := []string{"/bin/sh", "/builds/scripts/step_script"}
	withBind := func(b policy.Bind) mechanism.RunSpec {
		return mechanism.RunSpec{Image: sif, Binds: []policy.Bind{policy.SamePath("/builds"), b}, Argv: argv}
	}
	tests := []mechtest.CommandError{
		{Name: "colon in source", Spec: withBind(policy.Bind{Src: "/data/a:b", Dst: "/data"}), WantErr: "':' or ','"},
		{Name: "colon in destination", Spec: withBind(policy.Bind{Src: "/data", Dst: "/mnt/a:b"}), WantErr: "':' or ','"},
		{Name: "comma in source", Spec: withBind(policy.Bind{Src: "/data/a,b", Dst: "/data"}), WantErr: "/data/a,b"},
		{Name: "comma in destination", Spec: withBind(policy.Bind{Src: "/data", Dst: "/mnt/x,/etc"}), WantErr: "':' or ','"},
		{Name: "comma in a read-only bind", Spec: withBind(policy.Bind{Src: "/d,ro", Dst: "/d", ReadOnly: true}), WantErr: "':' or ','"},
		{Name: "same-path dir with a colon", Spec: withBind(policy.SamePath("/builds/a:b")), WantErr: "':' or ','"},
	}
	mechtest.CommandErrors(t, runtimeFor(config.Mechanism{}, nil).Command, append(tests, mechtest.SpecErrors(sif, nil, argv)...))
}

func TestDiagnose(t *testing.T) {
	const fatal = `FATAL:   container creation failed: mount hook function failure: mount /data->/data error: while mounting /data: mount source /data doesn't exist`
	mechtest.Diagnoses(t, runtimeFor(config.Mechanism{}, nil).Diagnose, []mechtest.Diagnosis{
		{Name: "apptainer failure", Code: 255, Tail: "INFO:    underlay of /builds required\n" + fatal + "\n", Want: fatal},
		{Name: "without trailing newline", Code: 255, Tail: fatal, Want: fatal},
		{Name: "last FATAL wins", Code: 255, Tail: "FATAL:   first\n" + fatal + "\n", Want: fatal},
		{Name: "leading blanks", Code: 255, Tail: "   " + fatal + "  \n", Want: fatal},
		{Name: "the script's exit 3", Code: 3, Tail: fatal + "\n"},
		{Name: "exit 1", Code: 1, Tail: fatal + "\n"},
		{Name: "exit 0", Code: 0, Tail: fatal},
		{Name: "255 without a FATAL line", Code: 255, Tail: "WARNING: something\nscript said exit 255\n"},
		{Name: "255 with ERROR only", Code: 255, Tail: "ERROR:   not fatal\n"},
		{Name: "255 with an empty tail", Code: 255, Tail: ""},
	})
}
