package template

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/mechanism/podman"
	"github.com/ci-exec/ci-exec/internal/policy"
)

const (
	jobUser = "ciuser"
	jobHome = "/home/ciuser"
)

// shippedPodman loads configs/templates/podman.toml as run_mechanism.
func shippedPodman(t *testing.T, extra string) *config.Config {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "..", "configs", "templates", "podman.toml"))
	require.NoError(t, err)
	doc := "[general]\ndata_dir = \"/d/$USER\"\nrun_mechanism = \"template:podman\"\n" + string(b) + extra
	cfg, err := config.Parse(doc, config.UserInfo{Name: jobUser, Home: jobHome})
	require.NoError(t, err)
	return cfg
}

func podmanRuntime(t *testing.T, uid int, extra string) *Runtime {
	cfg := shippedPodman(t, extra)
	return New("podman", cfg.Template(), *cfg.Mechanism(), config.UserInfo{Name: jobUser, Home: jobHome}, nil, time.Second, uid)
}

const digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

func podmanSpec() mechanism.RunSpec {
	return mechanism.RunSpec{
		Info: mechanism.Info{Programs: map[string]string{"podman": "/usr/bin/podman"}, ReadOnlyBinds: true},
		Image: mechanism.Image{Ref: "registry.example.org:5050/ci/busybox:1", Handle: "registry.example.org:5050/ci/busybox@" + digest,
			Digest: digest, Format: FormatReference, Shell: "/bin/sh", Lease: "/s/refs/sha256-0123.ref/job-7-build"},
		Binds: []policy.Bind{policy.SamePath("/d/ciuser/builds"), {Src: "/d/ciuser/scripts", Dst: "/d/ciuser/scripts", ReadOnly: true},
			{Src: "/scratch/a b", Dst: "/data"}},
		Workdir:      "/d/ciuser/builds/p",
		Env:          []string{"HOME=/home/ciuser", "PATH=/usr/bin:/bin", "SECRET_TOKEN=s3cr3t; rm -rf /", "USER=ciuser"},
		AdminOptions: []string{"--cpus=2"},
		UserArgs:     []string{"--env=X=$(id)", "--read-only"},
		Argv:         []string{"/bin/sh", "-c", "start", "/bin/sh", "/d/ciuser/scripts/build_script"},
	}
}

// TestPodmanTemplateCommand is the golden argv of the shipped Podman
// template: every value one word (a space, $(...) or ';' stays inside its
// word), lists expanded in place, the secret only in the environment.
func TestPodmanTemplateCommand(t *testing.T) {
	r := podmanRuntime(t, 1001, "")
	storage := "/var/tmp/ciuser.tpl-podman"
	run := RunDir(storage, 1001)
	argv, env, err := r.Command(podmanSpec())
	require.NoError(t, err)
	assert.Equal(t, []string{"/usr/bin/podman", "--root", storage + "/root", "--runroot", run + "/run", "--storage-driver", "overlay",
		"--log-level", "error", "run", "--rm", "--replace", "--name", "ci-exec-job-7-build", "--pull", "never",
		"--network", "host", "--http-proxy=false", "--security-opt", "no-new-privileges", "--log-driver", "none",
		"--init", "--preserve-fds", "1", "--userns", "keep-id", "--workdir", "/d/ciuser/builds/p",
		"--volume", "/d/ciuser/builds:/d/ciuser/builds", "--volume", "/d/ciuser/scripts:/d/ciuser/scripts:ro", "--volume", "/scratch/a b:/data",
		"--env", "HOME", "--env", "SECRET_TOKEN", "--env", "USER",
		"--entrypoint", "", "--cpus=2", "--env=X=$(id)", "--read-only",
		"registry.example.org:5050/ci/busybox@" + digest, "/bin/sh", "-c", "start", "/bin/sh", "/d/ciuser/scripts/build_script"}, argv)
	assert.Equal(t, []string{"PATH=" + r.ToolPath("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"), "HOME=/home/ciuser",
		"USER=ciuser", "LOGNAME=ciuser", "LANG=C.UTF-8",
		"XDG_RUNTIME_DIR=" + run, "XDG_CONFIG_HOME=" + storage + "/config", "XDG_DATA_HOME=" + storage + "/data", "TMPDIR=" + storage + "/tmp",
		"SECRET_TOKEN=s3cr3t; rm -rf /"}, env)
	for _, w := range argv {
		assert.NotContains(t, w, "s3cr3t", "no container value on the command line unless the runtime's own environment sets its name")
	}
}

// TestPodmanTemplateMatchesBuiltin: as root, the template's run command is
// the built-in's, word for word, apart from the storage paths and the
// image's name (an ID there, REPO@DIGEST here).
func TestPodmanTemplateMatchesBuiltin(t *testing.T) {
	cfg := shippedPodman(t, "")
	tpl := New("podman", cfg.Template(), *cfg.Mechanism(), config.UserInfo{Name: jobUser, Home: jobHome}, nil, time.Second, 0)
	builtin := podman.New(config.Mechanism{}, config.UserInfo{Name: jobUser, Home: jobHome}, nil, time.Second, 0)
	spec := podmanSpec()
	spec.Env = []string{"HOME=/other", "PATH=/usr/bin", "USER=ciuser"}
	spec.Info.Features = map[string]bool{podman.FeatureInit: true, podman.FeatureLogDriverNone: true}
	got, _, err := tpl.Command(spec)
	require.NoError(t, err)
	spec.Image.Handle = strings.Repeat("ab", 32)
	spec.Image.Lease = "/s/refs/x/job-7-build"
	want, _, err := builtin.Command(spec)
	require.NoError(t, err)
	require.Equal(t, len(want), len(got), "%q\n%q", want, got)
	for i := range want {
		switch {
		case want[i] == spec.Image.Handle:
			assert.Equal(t, "registry.example.org:5050/ci/busybox@"+digest, got[i])
		case strings.HasPrefix(want[i], "/var/tmp/ciuser.podman/") || strings.HasPrefix(want[i], "/tmp/ci-exec-podman-"):
			assert.True(t, strings.HasPrefix(got[i], "/var/tmp/ciuser.tpl-podman/") || strings.HasPrefix(got[i], "/tmp/ci-exec-tpl-0-"), got[i])
		default:
			assert.Equal(t, want[i], got[i], "word %d", i)
		}
	}
}

func TestPodmanTemplateRootHasNoKeepID(t *testing.T) {
	argv, _, err := podmanRuntime(t, 0, "").Command(podmanSpec())
	require.NoError(t, err)
	assert.NotContains(t, argv, "keep-id")
}

func TestCommandRefusals(t *testing.T) {
	r := podmanRuntime(t, 1001, "")
	spec := podmanSpec()
	spec.Binds = append(spec.Binds, policy.Bind{Src: "/scratch/x:y", Dst: "/x"})
	_, _, err := r.Command(spec)
	assert.ErrorContains(t, err, "a path containing ':' or ','")

	spec = podmanSpec()
	spec.Image.Lease = ""
	_, _, err = r.Command(spec)
	assert.ErrorContains(t, err, "no lease")

	// Without env_value a variable podman's own environment sets otherwise
	// is an error, never a wrong value.
	noValue := podmanRuntime(t, 1001, "")
	noValue.t.EnvValue = nil
	spec = podmanSpec()
	spec.Env = []string{"HOME=/other"}
	_, _, err = noValue.Command(spec)
	assert.ErrorContains(t, err, "cannot pass HOME to the container: the runtime's own environment sets it to")

	noRO := podmanRuntime(t, 1001, "")
	noRO.t.BindRO = nil
	_, _, err = noRO.Command(podmanSpec())
	assert.ErrorContains(t, err, "no bind_ro fragment")
}

func TestExpand(t *testing.T) {
	v := values{scalars: map[string]string{"a": "x y", "b": "{b}"}, lists: map[string][]string{"l": {"1", "2 3"}, "e": nil}}
	got, err := expand([]string{"p", "{l}", "--a={a}", "{e}", "{{lit}}", "{b}{a}", ""}, v)
	require.NoError(t, err)
	assert.Equal(t, []string{"p", "1", "2 3", "--a=x y", "{lit}", "{b}x y", ""}, got, "values are never expanded again")
	_, err = expand([]string{"{c}"}, v)
	assert.ErrorContains(t, err, "{c} has no value here")
	_, err = expand([]string{"--x={l}"}, v)
	assert.ErrorContains(t, err, "{l} has no value here", "a list never joins into a word")
}

// TestUserFlagsMatchPodman: every flag the Podman template lets users pass
// is a podman run flag of the same shape (a value-taking flag read as a
// switch would let its value pass as the image).
func TestUserFlagsMatchPodman(t *testing.T) {
	builtin := podman.New(config.Mechanism{}, config.UserInfo{Name: jobUser, Home: jobHome}, nil, time.Second, 0)
	table := map[string]policy.Flag{}
	for _, f := range builtin.RunFlags() {
		table[f.Long] = f
	}
	r := podmanRuntime(t, 1001, "")
	for _, f := range r.RunFlags() {
		b, ok := table[f.Long]
		require.True(t, ok, f.Long)
		assert.Equal(t, b.Arg, f.Arg, f.Long)
		assert.Equal(t, b.Short, f.Short, f.Long)
	}
	assert.ElementsMatch(t, builtin.DefaultUserArgs(), r.DefaultUserArgs())
}

func TestFlagTable(t *testing.T) {
	assert.Equal(t, policy.FlagTable{
		{Short: "-e", Long: "--env", Arg: policy.RequiredArg},
		{Long: "--read-only", Arg: policy.NoArg},
		{Long: "--set-env", Arg: policy.OptionalArg},
		{Short: "-w", Arg: policy.NoArg},
	}, FlagTable([]string{"-e/--env=", "--read-only", "--set-env[=]", "-w"}))
}

func TestIdentity(t *testing.T) {
	r := podmanRuntime(t, 1001, "")
	assert.Equal(t, "template:podman", r.Name())
	assert.Equal(t, "JACAMAR_CI_PODMAN_ARGS", r.UserArgsVariable())
	assert.Equal(t, "PODMAN_REGISTRY_USERNAME", r.CredentialVariables().Username)
	assert.Equal(t, "/var/tmp/ciuser.tpl-podman", r.Storage)
	assert.LessOrEqual(t, len(RunDir("/"+strings.Repeat("x", 300), 4294967294)+"/run"), 50)
	assert.Equal(t, "Error: no such image", r.Diagnose(125, "Error: no such image\n"))
	assert.Equal(t, "", r.Diagnose(3, "Error: printed by the script\n"))
	names, paths := r.programs()
	assert.Equal(t, []string{"podman"}, names)
	assert.Empty(t, paths)
}
