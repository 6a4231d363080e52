package doctor

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/idtoken/idtokentest"
	"github.com/ci-exec/ci-exec/internal/testenv"
)

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.toml")
	require.NoError(t, os.WriteFile(p, []byte(body), 0o644))
	return p
}

func failures(r *Report) []Check {
	var out []Check
	for _, c := range r.Checks {
		if c.Status == Fail {
			out = append(out, c)
		}
	}
	return out
}

func find(r *Report, area, contains string) *Check {
	for i, c := range r.Checks {
		if c.Area == area && strings.Contains(c.Message, contains) {
			return &r.Checks[i]
		}
	}
	return nil
}

func TestHostConfigPasses(t *testing.T) {
	dir := t.TempDir()
	r := Run(context.Background(), writeConfig(t, fmt.Sprintf("[general]\ndata_dir = %q\n", filepath.Join(dir, "data", "$USER"))))
	assert.Empty(t, failures(r))
	assert.NotNil(t, find(r, "config", "is valid"))
	assert.NotNil(t, find(r, "data_dir", "will be created"))
	var out bytes.Buffer
	r.Print(&out)
	assert.Regexp(t, `(?m)^✓ config\s+.* is valid \(executor shell, run_mechanism host\)$`, out.String())
	assert.Contains(t, out.String(), "all checks passed")
}

func TestEveryConfigProblemWithKeyAndLine(t *testing.T) {
	r := Run(context.Background(), writeConfig(t, `[general]
data_dir = "relative"
image_alowlist = ["x"]
run_mechanism = "podmann"

[general.charliecloud]
pull_polcy = "always"
`))
	fails := failures(r)
	require.Len(t, fails, 4, "every problem at once: %+v", fails)
	want := []struct {
		key  string
		line int
		msg  string
	}{
		{"general.data_dir", 2, "must be an absolute path"},
		{"general.image_alowlist", 3, `unknown key "general.image_alowlist"`},
		{"general.run_mechanism", 4, "general.run_mechanism must be"},
		{"general.charliecloud.pull_polcy", 7, "unknown key"},
	}
	for i, w := range want {
		assert.Equal(t, w.key, fails[i].Key)
		assert.Equal(t, w.line, fails[i].Line)
		assert.Contains(t, fails[i].Message, w.msg)
	}
	var out bytes.Buffer
	r.Print(&out)
	assert.Regexp(t, `(?m)^✗ config\s+unknown key "general.image_alowlist" \(check the spelling; see docs/config.md\) \(line 3\)$`, out.String())
}

func TestUnreadableConfig(t *testing.T) {
	var out, errOut bytes.Buffer
	code := Main(context.Background(), nil, filepath.Join(t.TempDir(), "none.toml"), &out, &errOut)
	assert.Equal(t, 1, code)
	assert.Contains(t, out.String(), "✗ config")
	assert.Contains(t, out.String(), "pass --config PATH")
}

func TestMissingImageStorageDir(t *testing.T) {
	testenv.RequireBinary(t, "ch-run")
	dir := t.TempDir()
	r := Run(context.Background(), writeConfig(t, fmt.Sprintf(
		"[general]\ndata_dir = %q\nrun_mechanism = \"charliecloud\"\n[general.charliecloud]\nimage_storage_dir = %q\n",
		filepath.Join(dir, "data"), filepath.Join(dir, "no-such-dir"))))
	c := find(r, "storage", "does not exist")
	require.NotNil(t, c, "%+v", r.Checks)
	assert.Equal(t, Fail, c.Status)
	assert.Equal(t, "general.charliecloud.image_storage_dir", c.Key)
	assert.Contains(t, c.Fix, "install -d -m 1777")
}

func TestRuntimeProbes(t *testing.T) {
	for _, rt := range []struct{ name, program, table, version string }{
		{"charliecloud", "ch-run", "", `^charliecloud [0-9]+\.[0-9]+`},
		{"apptainer", "apptainer", `application_path = "/opt/apptainer/bin"`, `^apptainer [0-9]+\.[0-9]+\.[0-9]+`},
	} {
		t.Run(rt.name, func(t *testing.T) {
			testenv.RequireBinary(t, rt.program)
			dir := t.TempDir()
			storage := filepath.Join(dir, "images")
			require.NoError(t, os.Mkdir(storage, 0o755))
			anon := testenv.Fact(t, "CI_EXEC_TEST_IMAGE_ANON")
			host, _, _ := strings.Cut(anon, "/")
			r := Run(context.Background(), writeConfig(t, fmt.Sprintf(
				"[general]\ndata_dir = %q\nrun_mechanism = %q\n[general.%s]\nimage_storage_dir = %q\nimage_allowlist = ['%s/.*', '127\\.0\\.0\\.1:1/x/.*']\n%s\n",
				filepath.Join(dir, "data"), rt.name, rt.name, storage, regexp.QuoteMeta(host), rt.table)))
			var version *Check
			for i, c := range r.Checks {
				if c.Area == rt.name && regexp.MustCompile(rt.version).MatchString(c.Message) {
					version = &r.Checks[i]
				}
			}
			require.NotNil(t, version, "a version line: %+v", r.Checks)
			assert.Equal(t, OK, version.Status)
			assert.NotNil(t, find(r, rt.name, "user namespaces"))
			reg := find(r, "registry", host+" answers")
			require.NotNil(t, reg, "%+v", r.Checks)
			bad := find(r, "registry", "127.0.0.1:1")
			require.NotNil(t, bad)
			assert.Equal(t, Fail, bad.Status)
			assert.Contains(t, bad.Fix, "nothing answers")
			// Only the unreachable registry fails.
			assert.Len(t, failures(r), 1, "%+v", failures(r))
		})
	}
}

func TestOtherConfiguredRuntimeProbed(t *testing.T) {
	testenv.RequireBinary(t, "ch-run")
	testenv.RequireBinary(t, "apptainer")
	dir := t.TempDir()
	storage := filepath.Join(dir, "images")
	require.NoError(t, os.Mkdir(storage, 0o755))
	r := Run(context.Background(), writeConfig(t, fmt.Sprintf(
		"[general]\ndata_dir = %q\nrun_mechanism = \"charliecloud\"\n[general.charliecloud]\nimage_storage_dir = %q\n[general.apptainer]\napplication_path = \"/opt/apptainer/bin\"\nimage_storage_dir = %q\n",
		filepath.Join(dir, "data"), storage, storage)))
	assert.NotNil(t, find(r, "charliecloud", "charliecloud 0."), "%+v", r.Checks)
	c := find(r, "apptainer", "(configured, not the run_mechanism)")
	require.NotNil(t, c, "%+v", r.Checks)
	assert.Equal(t, OK, c.Status)
	assert.Regexp(t, `^apptainer [0-9]+\.[0-9]+`, c.Message)
}

func TestJWKS(t *testing.T) {
	dir := t.TempDir()
	iss := idtokentest.New(t, "https://gitlab.example.com")
	good := iss.WriteJWKS(t, dir)
	bad := filepath.Join(dir, "bad.json")
	require.NoError(t, os.WriteFile(bad, []byte("{not json"), 0o644))
	for file, want := range map[string]Status{good: OK, bad: Fail} {
		r := Run(context.Background(), writeConfig(t, fmt.Sprintf("[general]\ndata_dir = %q\n[auth]\njwks_file = %q\n",
			filepath.Join(dir, "data"), file)))
		c := find(r, "auth", "JWKS from file "+file)
		require.NotNil(t, c, "%+v", r.Checks)
		assert.Equal(t, want, c.Status, c.Message)
		if want == Fail {
			assert.Equal(t, "auth.jwks_file", c.Key)
		} else {
			assert.Regexp(t, `: [1-9][0-9]* key\(s\)$`, c.Message)
		}
	}
}

func slurmConfig(t *testing.T, dir string) string {
	return writeConfig(t, fmt.Sprintf("[general]\ndata_dir = %q\nexecutor = \"slurm\"\n[batch]\noptions = [\"--partition=%s\"]\n",
		filepath.Join(dir, "data"), testenv.Fact(t, "CI_EXEC_TEST_SLURM_PARTITION")))
}

func TestSlurm(t *testing.T) {
	testenv.RequireBinary(t, "sbatch")
	dir := t.TempDir()
	cfg := slurmConfig(t, dir)
	r := Run(context.Background(), cfg)
	assert.Empty(t, failures(r), "%+v", r.Checks)
	assert.NotNil(t, find(r, "slurm", "is UP"))
	assert.NotNil(t, find(r, "slurm", "sbatch --test-only: Job"))

	// A controller nobody answers for: the real scontrol, pointed at a
	// port where nothing listens.
	b, err := os.ReadFile("/etc/slurm/slurm.conf")
	require.NoError(t, err)
	conf := filepath.Join(dir, "slurm.conf")
	require.NoError(t, os.WriteFile(conf, append(b, []byte("\nSlurmctldPort=1\n")...), 0o644))
	t.Setenv("SLURM_CONF", conf)
	r = Run(context.Background(), cfg)
	c := find(r, "slurm", "scontrol ping")
	require.NotNil(t, c, "%+v", r.Checks)
	assert.Equal(t, Fail, c.Status)
	assert.Contains(t, c.Message, "DOWN")
	assert.Contains(t, c.Fix, "start slurmctld")
	assert.Equal(t, "general.executor", c.Key)
}

func TestJSONAndAsUser(t *testing.T) {
	testenv.RequireRoot(t)
	u := testenv.Unprivileged(t)
	base := testenv.PrivateDir(t, u)
	// A storage dir the user cannot write into: what they would meet.
	storage := filepath.Join(base, "images")
	require.NoError(t, os.Mkdir(storage, 0o755))
	cfg := filepath.Join(base, "config.toml")
	require.NoError(t, os.WriteFile(cfg, []byte(fmt.Sprintf(
		"[general]\ndata_dir = %q\nrun_mechanism = \"charliecloud\"\n[general.charliecloud]\nimage_storage_dir = %q\n",
		filepath.Join(base, "data", "$USER"), storage)), 0o644))
	cmd := exec.Command(testenv.Driver(t), "--config", cfg, "check", "--json", "--as", u.Name)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	var ee *exec.ExitError
	require.ErrorAs(t, err, &ee, "stderr: %s", errOut.String())
	assert.Equal(t, 1, ee.ExitCode())
	var r Report
	require.NoError(t, json.Unmarshal(out.Bytes(), &r), out.String())
	assert.Equal(t, u.Name, r.User)
	c := find(&r, "storage", "cannot create")
	require.NotNil(t, c, "%s", out.String())
	assert.Contains(t, c.Message, u.Name+".ch")
	assert.NotNil(t, find(&r, "data_dir", filepath.Join(base, "data", u.Name)), "$USER is the user's")

	// As root itself, the same storage dir is fine.
	cmd = exec.Command(testenv.Driver(t), "--config", cfg, "check")
	out.Reset()
	cmd.Stdout = &out
	_ = cmd.Run()
	assert.NotContains(t, out.String(), "cannot create")
}

func TestDiagnoseMatchesLoad(t *testing.T) {
	// A config Load takes is one Diagnose finds nothing wrong with.
	doc := "[general]\ndata_dir = \"/srv/ci/$USER\"\nrun_mechanism = \"apptainer\"\n[general.apptainer]\nimage_allowlist = ['x/.*']\n"
	u := config.UserInfo{Name: "alice", Home: "/home/alice"}
	_, err := config.Parse(doc, u)
	require.NoError(t, err)
	cfg, probs := config.Diagnose(doc, u)
	assert.Empty(t, probs)
	assert.Equal(t, "/srv/ci/alice", cfg.General.DataDir)
}

func TestAllowlistRegistries(t *testing.T) {
	m := config.Mechanism{
		ImageAllowlist: []string{`127\.0\.0\.1:5443/ci/.*`, `^docker\.io/library/alpine:.*`, `.*`, `registry\.example\.org/.*`, `[a-z]+\.example/x`},
		DefaultImage:   "ghcr.io/org/img:1",
	}
	assert.Equal(t, []string{"127.0.0.1:5443", "docker.io", "ghcr.io", "registry.example.org"}, allowlistRegistries(m))
}

func TestPartitionFromOptions(t *testing.T) {
	for opts, want := range map[string]string{
		"--partition=debug":     "debug",
		"--partition debug":     "debug",
		"-p debug":              "debug",
		"-pdebug":               "debug",
		"--time=10 --account=x": "",
	} {
		assert.Equal(t, want, partition(strings.Fields(opts)), opts)
	}
}

// TestDownscopeDeployment: a downscoping config is checked for what the
// runner itself needs: a trusted state_dir and a writable audit trail.
func TestDownscopeDeployment(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	iss := idtokentest.New(t, "https://gitlab.example.com")
	jwks := iss.WriteJWKS(t, dir)
	cfg := func(state string) string {
		return writeConfig(t, fmt.Sprintf("[general]\ndata_dir = %q\ngitlab_server = \"https://gitlab.example.com\"\n[auth]\ndownscope = \"setuid\"\njwks_file = %q\nstate_dir = %q\naudit_log = %q\n",
			filepath.Join(dir, "data", "$USER"), jwks, state, filepath.Join(dir, "audit.jsonl")))
	}
	r := Run(context.Background(), cfg(testenv.StateRoot(t)))
	c := find(r, "auth", "downscoping: can switch to job users")
	require.NotNil(t, c, "%+v", r.Checks)
	assert.Equal(t, OK, c.Status)

	shared := filepath.Join(dir, "shared")
	require.NoError(t, os.Mkdir(shared, 0o777))
	require.NoError(t, os.Chmod(shared, 0o777))
	r = Run(context.Background(), cfg(filepath.Join(shared, "state")))
	c = find(r, "auth", "is writable by group or others")
	require.NotNil(t, c, "%+v", r.Checks)
	assert.Equal(t, Fail, c.Status)
	assert.True(t, r.Failed())
}

// TestTemplateRuntime: ci-exec check probes a template runtime as its
// stages do (its programs, its version action), names its table
// runtimes.NAME, and a template program that is missing fails with the
// key to fix.
func TestTemplateRuntime(t *testing.T) {
	testenv.RequireBinary(t, "podman")
	b, err := os.ReadFile(filepath.Join("..", "..", "configs", "templates", "podman.toml"))
	require.NoError(t, err)
	dir := t.TempDir()
	storage := filepath.Join(dir, "no-such-dir")
	doc := fmt.Sprintf("[general]\ndata_dir = %q\nrun_mechanism = \"template:podman\"\n%s\nimage_storage_dir = %q\n",
		filepath.Join(dir, "data"), string(b), storage)
	r := Run(context.Background(), writeConfig(t, doc))
	v := find(r, "template:podman", "podman version ")
	require.NotNil(t, v, "%+v", r.Checks)
	assert.Equal(t, OK, v.Status)
	c := find(r, "storage", "does not exist")
	require.NotNil(t, c, "%+v", r.Checks)
	assert.Equal(t, "runtimes.podman.image_storage_dir", c.Key)

	r = Run(context.Background(), writeConfig(t, strings.Replace(doc, "\nimage_storage_dir", "\napplication_path = \""+dir+"\"\nimage_storage_dir", 1)))
	c = find(r, "template:podman", "podman not found")
	require.NotNil(t, c, "%+v", r.Checks)
	assert.Equal(t, Fail, c.Status)
	assert.Equal(t, "runtimes.podman.application_path", c.Key)
	assert.Contains(t, c.Message, "set runtimes.podman.application_path")
}
