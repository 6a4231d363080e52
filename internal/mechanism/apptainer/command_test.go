package apptainer

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/mechanism"
)

func TestIdentityAndStorage(t *testing.T) {
	tests := []struct {
		name, root, want string
	}{
		{"default under /var/tmp", "", "/var/tmp/ciuser.apptainer"},
		{"configured", "/scratch/images", "/scratch/images/ciuser.apptainer"},
		{"trailing slash", "/scratch/images/", "/scratch/images/ciuser.apptainer"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, mechanism.StorageDir(tt.root, jobUser+".apptainer"))
			r := runtimeFor(config.Mechanism{ImageStorageDir: tt.root}, nil)
			assert.Equal(t, tt.want, r.Storage)
			assert.Equal(t, []string{"CI_EXEC_APPTAINER_STORAGE=" + tt.want}, r.PrepEnv())
		})
	}
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
	r := runtimeFor(config.Mechanism{}, nil)
	known := map[string]mechanism.ArgKind{}
	for _, f := range r.RunFlags() {
		known[f.Long] = f.Arg
		if f.Short != "" {
			known[f.Short] = f.Arg
		}
	}
	for _, f := range r.DefaultUserArgs() {
		_, ok := known[f]
		assert.True(t, ok, "default user arg %s is not an exec option", f)
	}
	dangerous := []string{"--bind", "-B", "--mount", "--fusemount", "--overlay", "-o", "--writable", "-w", "--fakeroot", "-f",
		"--home", "-H", "--workdir", "-W", "--scratch", "-S", "--allow-setuid", "--keep-privs", "--add-caps", "--security",
		"--userns", "-u", "--docker-login", "--docker-username", "--docker-password", "--authfile", "--env-file",
		"--app", "--containlibs", "--netns-path", "--network", "--device", "--tmpdir", "--no-https", "--nohttps"}
	for _, bad := range dangerous {
		assert.NotContains(t, r.DefaultUserArgs(), bad)
	}
	// Every option that takes a value must be declared so: a value-taking
	// flag declared NoArg would let its value pass as the image.
	for _, long := range []string{"--bind", "--env", "--pwd", "--overlay", "--home", "--mount", "--security"} {
		assert.Equal(t, mechanism.RequiredArg, known[long], long)
	}
}

func TestCommandArgv(t *testing.T) {
	sysInfo := mechanism.Info{Version: "1.5.3", Programs: map[string]string{"apptainer": "/usr/bin/apptainer"}}
	appInfo := mechanism.Info{Version: "1.5.3", Programs: map[string]string{"apptainer": "/opt/apptainer/bin/apptainer"}}
	sif := mechanism.Image{Handle: "/builds/scripts/j42-abc.sif", Format: FormatSIF, Shell: "/bin/bash"}
	sifWithOpts := sif
	sifWithOpts.RunOptions = []string{"--underlay"}
	binds := []mechanism.Bind{
		mechanism.SamePath("/builds/ci"),
		mechanism.SamePath("/builds/scripts"),
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
			want: []string{"/usr/bin/apptainer", "exec", "--cleanenv",
				"--bind=/builds/ci:/builds/ci", "--bind=/builds/scripts:/builds/scripts", "--bind=/data/ref:/ref:ro",
				"--pwd=/builds/ci", "--underlay", "--nv", "--no-home", "--env=A=1", "--pid",
				"/builds/scripts/j42-abc.sif", "/bin/bash", "/builds/scripts/step_script"},
		},
		{
			name: "application_path program, one bind",
			spec: mechanism.RunSpec{Info: appInfo, Image: sif, Binds: binds[:1], Workdir: "/builds/ci", Env: env, Argv: script},
			want: []string{"/opt/apptainer/bin/apptainer", "exec", "--cleanenv", "--bind=/builds/ci:/builds/ci", "--pwd=/builds/ci",
				"/builds/scripts/j42-abc.sif", "/bin/bash", "/builds/scripts/step_script"},
		},
		{
			name: "no binds, no workdir, program unknown",
			spec: mechanism.RunSpec{Image: sif, Argv: []string{"/bin/sh"}},
			want: []string{"apptainer", "exec", "--cleanenv", "/builds/scripts/j42-abc.sif", "/bin/sh"},
		},
		{
			name: "option-like words after the image stay the command's",
			spec: mechanism.RunSpec{Info: sysInfo, Image: sif, UserArgs: []string{"--contain"},
				Argv: []string{"/bin/sh", "-c", "--bind=/:/host"}},
			want: []string{"/usr/bin/apptainer", "exec", "--cleanenv", "--contain", "/builds/scripts/j42-abc.sif",
				"/bin/sh", "-c", "--bind=/:/host"},
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
	withBind := func(b mechanism.Bind) mechanism.RunSpec {
		return mechanism.RunSpec{Image: sif, Binds: []mechanism.Bind{mechanism.SamePath("/builds"), b}, Argv: argv}
	}
	tests := []struct {
		name    string
		spec    mechanism.RunSpec
		wantErr string
	}{
		{"colon in source", withBind(mechanism.Bind{Src: "/data/a:b", Dst: "/data"}), "':' or ','"},
		{"colon in destination", withBind(mechanism.Bind{Src: "/data", Dst: "/mnt/a:b"}), "':' or ','"},
		{"comma in source", withBind(mechanism.Bind{Src: "/data/a,b", Dst: "/data"}), "/data/a,b"},
		{"comma in destination", withBind(mechanism.Bind{Src: "/data", Dst: "/mnt/x,/etc"}), "':' or ','"},
		{"comma in a read-only bind", withBind(mechanism.Bind{Src: "/d,ro", Dst: "/d", ReadOnly: true}), "':' or ','"},
		{"same-path dir with a colon", withBind(mechanism.SamePath("/builds/a:b")), "':' or ','"},
		{"nil argv", mechanism.RunSpec{Image: sif}, "no command"},
		{"empty argv", mechanism.RunSpec{Image: sif, Argv: []string{}}, "no command"},
		{"empty handle", mechanism.RunSpec{Image: mechanism.Image{Format: FormatSIF}, Argv: argv}, "no image"},
	}
	r := runtimeFor(config.Mechanism{}, nil)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, e, err := r.Command(tt.spec)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.wantErr)
			assert.Nil(t, a)
			assert.Nil(t, e)
		})
	}
}

func TestDiagnose(t *testing.T) {
	const fatal = `FATAL:   container creation failed: mount hook function failure: mount /data->/data error: while mounting /data: mount source /data doesn't exist`
	tests := []struct {
		name string
		code int
		tail string
		want string
	}{
		{"apptainer failure", 255, "INFO:    underlay of /builds required\n" + fatal + "\n", fatal},
		{"without trailing newline", 255, fatal, fatal},
		{"last FATAL wins", 255, "FATAL:   first\n" + fatal + "\n", fatal},
		{"leading blanks", 255, "   " + fatal + "  \n", fatal},
		{"the script's exit 3", 3, fatal + "\n", ""},
		{"exit 1", 1, fatal + "\n", ""},
		{"exit 0", 0, fatal, ""},
		{"255 without a FATAL line", 255, "WARNING: something\nscript said exit 255\n", ""},
		{"255 with ERROR only", 255, "ERROR:   not fatal\n", ""},
		{"255 with an empty tail", 255, "", ""},
	}
	r := runtimeFor(config.Mechanism{}, nil)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, r.Diagnose(tt.code, tt.tail))
		})
	}
}
