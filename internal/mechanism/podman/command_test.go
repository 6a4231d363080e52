package podman

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/mechanism/mechtest"
	"github.com/ci-exec/ci-exec/internal/policy"
)

const (
	jobUser = "ciuser"
	jobHome = "/home/ciuser"
)

func runtimeFor(cfg config.Mechanism, hostEnv map[string]string) *Runtime {
	return New(cfg, config.UserInfo{Name: jobUser, Home: jobHome}, hostEnv, 2*time.Second, 1001)
}

func TestIdentityAndStorage(t *testing.T) {
	mechtest.StorageDirs(t, jobUser+".podman", "CI_EXEC_PODMAN_STORAGE", runtimeFor, func(r *Runtime) string { return r.Storage })
	r := runtimeFor(config.Mechanism{}, nil)
	assert.Equal(t, "podman", r.Name())
	assert.Equal(t, "JACAMAR_CI_PODMAN_ARGS", r.UserArgsVariable())
	assert.Equal(t, "PODMAN_REGISTRY_USERNAME", r.CredentialVariables().Username)
	assert.Equal(t, "PODMAN_REGISTRY_PASSWORD", r.CredentialVariables().Password)
	// Podman 4.3 refuses a run root longer than 50 characters.
	long := New(config.Mechanism{ImageStorageDir: "/" + strings.Repeat("x", 200)}, config.UserInfo{Name: jobUser, Home: jobHome}, nil, time.Second, 4294967294)
	assert.LessOrEqual(t, len(long.runRoot()), 50)
	assert.NotEqual(t, r.runDir(), long.runDir(), "one run root per storage")
}

// TestDefaultUserArgs checks that the default user flags are all run
// options and that none mounts host paths, changes identity, namespaces or
// privileges, reaches a registry or picks another image or entry point.
func TestDefaultUserArgs(t *testing.T) {
	dangerous := []string{"--volume", "-v", "--mount", "--device", "--privileged", "--cap-add", "--security-opt", "--userns",
		"--pid", "--network", "--net", "--ipc", "--uts", "--cgroupns", "--user", "-u", "--group-add", "--env-host", "--env-file",
		"--volumes-from", "--rootfs", "--entrypoint", "--authfile", "--creds", "--pull", "--tls-verify", "--name", "--replace",
		"--workdir", "-w", "--preserve-fds", "--init-path", "--image-volume", "--secret", "--sdnotify", "--seccomp-policy",
		"--uidmap", "--gidmap", "--subuidname", "--subgidname", "--conmon-pidfile", "--cidfile", "--log-opt", "--log-driver",
		"--passwd-entry", "--chrootdirs", "--personality", "--cgroup-parent", "--tty", "-t", "--interactive", "-i", "--detach", "-d"}
	known := mechtest.DefaultUserArgs(t, runtimeFor(config.Mechanism{}, nil), dangerous)
	// A value-taking flag declared NoArg would let its value pass as the
	// image.
	for _, long := range []string{"--volume", "-v", "--env", "-e", "--mount", "--workdir", "--entrypoint", "--user", "--network"} {
		assert.Equal(t, policy.RequiredArg, known[long], long)
	}
	for _, sw := range []string{"--privileged", "--rm", "--init", "--env-host", "--read-only", "-t", "-i"} {
		assert.Equal(t, policy.NoArg, known[sw], sw)
	}
}

func TestUserArgsPolicy(t *testing.T) {
	r := runtimeFor(config.Mechanism{}, nil)
	p := policy.UserArgsPolicy{Variable: r.UserArgsVariable(), Default: r.DefaultUserArgs(), Flags: r.RunFlags(), Key: "general.podman.allowed_user_args"}
	args, _, err := p.UserArgs(map[string]string{"JACAMAR_CI_PODMAN_ARGS": `--env=A=1 -e B --memory 1g --tmpfs /scratch`})
	require.NoError(t, err)
	assert.Equal(t, []string{"--env=A=1", "-e", "B", "--memory", "1g", "--tmpfs", "/scratch"}, args)
	for _, bad := range []string{"-v /etc:/x", "--volume=/:/x", "--privileged", "--mount=type=bind,src=/,dst=/x", "--device /dev/fuse",
		"--cap-add=ALL", "--security-opt label=disable", "--userns=host", "--pid=host", "--network=host", "--env-host", "-it",
		"--vol=/x:/y", "alpine", "--entrypoint=/bin/sh"} {
		_, _, err := p.UserArgs(map[string]string{"JACAMAR_CI_PODMAN_ARGS": bad})
		assert.Error(t, err, bad)
		assert.True(t, failure.ClassOf(err) == failure.User, bad)
	}
}

var info = mechanism.Info{Version: "4.3.1", Programs: map[string]string{"podman": "/usr/bin/podman"},
	Features: map[string]bool{FeatureInit: true, FeatureLogDriverNone: true, FeatureReplace: true, FeaturePreserveFDs: true}, ReadOnlyBinds: true}

const id = "bf2ccc26614de88fbeedeb7da6def1469db6b8a4a0c89210e7af103bdd1718c9"

func spec() mechanism.RunSpec {
	return mechanism.RunSpec{
		Info:    info,
		Image:   mechanism.Image{Handle: id, Format: FormatPodman, Shell: "/bin/sh", Lease: "/s/ciuser.ci-exec/podman/refs/sha256-x.podman/j42-abc"},
		Binds:   []policy.Bind{policy.SamePath("/d/builds"), {Src: "/d/scripts", Dst: "/d/scripts", ReadOnly: true}},
		Workdir: "/d/builds/p",
		Env:     []string{"CI_EXEC_PASSED=s3cret", "HOME=/home/ciuser", "PATH=/usr/bin:/bin", "USER=ciuser", "XDG_CONFIG_HOME=/x"},
		Argv:    []string{"/bin/sh", "/d/scripts/step_script"},
	}
}

func TestCommandArgv(t *testing.T) {
	storage := "/var/tmp/ciuser.podman"
	global := []string{"/usr/bin/podman", "--root", storage + "/root", "--runroot", RunDir(storage, 1001) + "/run", "--storage-driver", "overlay", "--log-level", "error"}
	common := []string{"run", "--rm", "--replace", "--name", "ci-exec-j42-abc", "--pull", "never", "--network", "host", "--http-proxy=false",
		"--security-opt", "no-new-privileges", "--log-driver", "none", "--init", "--preserve-fds", "1"}
	tail := []string{"--workdir", "/d/builds/p", "--volume", "/d/builds:/d/builds", "--volume", "/d/scripts:/d/scripts:ro",
		"--env", "CI_EXEC_PASSED", "--env", "HOME", "--env", "USER", "--env", "XDG_CONFIG_HOME=/x"}

	t.Run("rootless", func(t *testing.T) {
		argv, env, err := runtimeFor(config.Mechanism{}, nil).Command(spec())
		require.NoError(t, err)
		want := append(append(append(append([]string{}, global...), common...), "--userns", "keep-id"), tail...)
		want = append(want, "--entrypoint", "", id, "/bin/sh", "/d/scripts/step_script")
		assert.Equal(t, want, argv)
		assert.Contains(t, env, "CI_EXEC_PASSED=s3cret", "the value travels in podman's environment")
		assert.NotContains(t, strings.Join(argv, " "), "s3cret", "never on the command line")
		assert.Contains(t, env, "XDG_CONFIG_HOME="+storage+"/config", "podman's own setting is kept")
		for _, kv := range env {
			assert.False(t, strings.HasPrefix(kv, "PATH=/usr/bin:/bin"), "the container's PATH is the image's")
		}
	})
	t.Run("root: no keep-id; admin options, entry point and user args in order", func(t *testing.T) {
		r := New(config.Mechanism{}, config.UserInfo{Name: "root", Home: "/root"}, nil, time.Second, 0)
		s := spec()
		s.Image.RunOptions = entryPointOptions([]string{"/entry.sh", "--"})
		s.AdminOptions = []string{"--cpus=2"}
		s.UserArgs = []string{"--env=A=1"}
		argv, _, err := r.Command(s)
		require.NoError(t, err)
		assert.NotContains(t, argv, "keep-id")
		n := len(argv)
		assert.Equal(t, []string{"--entrypoint", `["/entry.sh","--"]`, "--cpus=2", "--env=A=1", id, "/bin/sh", "/d/scripts/step_script"}, argv[n-7:])
	})
	t.Run("refused", func(t *testing.T) {
		r := runtimeFor(config.Mechanism{}, nil)
		s := spec()
		s.Binds = append(s.Binds, policy.Bind{Src: "/a:b", Dst: "/c"})
		_, _, err := r.Command(s)
		assert.ErrorContains(t, err, "cannot express a path containing ':'")
		s = spec()
		s.Image.Lease = ""
		_, _, err = r.Command(s)
		assert.ErrorContains(t, err, "no lease")
		s = spec()
		s.Image.Lease = "/x/refs/k/J42 ABC"
		_, _, err = r.Command(s)
		assert.ErrorContains(t, err, "names no job")
		s = spec()
		s.Env = append(s.Env, "BAD-NAME=x")
		_, _, err = r.Command(s)
		assert.Error(t, err)
	})
}

func TestDiagnose(t *testing.T) {
	r := runtimeFor(config.Mechanism{}, nil)
	tail := "out\nError: runc: runc create failed: unable to start container process: exec: \"/nonexist\": stat /nonexist: no such file or directory\n"
	assert.Equal(t, "", r.Diagnose(3, tail), "a script's own exit code")
	assert.Contains(t, r.Diagnose(127, tail), "Error: runc: runc create failed")
	assert.Equal(t, "", r.Diagnose(125, "no error line\n"))
}

func TestParseVersion(t *testing.T) {
	for out, want := range map[string]string{"podman version 4.3.1\n": "4.3.1", "podman version 5.2.2-dev\n": "5.2.2-dev"} {
		v, err := ParseVersion(out)
		require.NoError(t, err)
		assert.Equal(t, want, v)
	}
	_, err := ParseVersion("Error: cannot re-exec process\n")
	assert.ErrorContains(t, err, "cannot read the version")
}

func TestClassifyPull(t *testing.T) {
	job := auth.Credential{Source: auth.JobToken, Username: auth.JobTokenUser, Registry: "r:5443"}
	user := auth.Credential{Source: auth.UserVariables, Username: "me", Registry: "r:5443"}
	tests := []struct {
		tail    string
		cred    auth.Credential
		user    bool
		contain string
	}{
		{"Error: initializing source docker://r:5443/x@sha256:1: reading manifest sha256:1 in r:5443/x: unauthorized: authentication required\n", user, true, "PODMAN_REGISTRY_USERNAME/PODMAN_REGISTRY_PASSWORD"},
		{"Error: initializing source docker://r:5443/x: reading manifest: unauthorized: authentication required\n", job, false, "refused the job token"},
		{"Error: initializing source docker://r:5443/x: reading manifest latest in r:5443/x: manifest unknown: manifest unknown\n", auth.Credential{}, true, "image not found"},
		{"Error: initializing source docker://r:5443/x: pinging container registry r:5443: Get \"https://r:5443/v2/\": x509: certificate signed by unknown authority\n", auth.Credential{}, false, "TLS certificate"},
		{"Error: initializing source docker://r:5443/x: pinging container registry r:5443: Get \"https://r:5443/v2/\": http: server gave HTTP response to HTTPS client\n", auth.Credential{}, false, "plain HTTP"},
		{"Error: initializing source docker://r:5443/x: pinging container registry r:5443: Get \"https://r:5443/v2/\": dial tcp 127.0.0.1:5443: connect: connection refused\n", auth.Credential{}, false, "connection refused by 127.0.0.1:5443"},
		{"Error: writing blob: storing blob to file \"/x\": write /x: no space left on device\n", auth.Credential{}, false, "image storage"},
		{"Error: something new\n", auth.Credential{}, false, "podman pull failed: Error: something new"},
	}
	for _, tt := range tests {
		err := classifyPull("r:5443/x:latest", tt.cred, tt.tail, "/s")
		assert.ErrorContains(t, err, tt.contain, tt.tail)
		assert.Equal(t, tt.user, failure.ClassOf(err) == failure.User, tt.tail)
	}
}

func TestPullArgvNoCredentials(t *testing.T) {
	r := runtimeFor(config.Mechanism{}, nil)
	req := mechanism.PullRequest{Insecure: true}
	argv := r.pullArgv(info, req, "r:5446/x@sha256:1", "/state/podman-auth-j1-a.json")
	assert.Equal(t, []string{"pull", "--authfile", "/state/podman-auth-j1-a.json", "--tls-verify=false", "docker://r:5446/x@sha256:1"}, argv[len(argv)-5:])
	for _, kv := range r.toolEnv() {
		assert.NotContains(t, kv, "PASSWORD")
	}
}
