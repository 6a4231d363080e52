package localjob_test

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/runnerdouble"
	"github.com/ci-exec/ci-exec/internal/testenv"
)

// pipelineYAML uses what the issue names: default:, extends: (nested and
// multiple), variables: (global and job), before_script, !reference,
// include: local, after_script and artifacts:. IMAGE is replaced per test.
const pipelineYAML = `
include:
  - local: ci/common.yml
variables:
  GREETING: hello
  MARKER: "@MARKER@"
default:
  @IMAGE@
  before_script:
    - echo "before_script from default"
.base:
  variables:
    WHO: world
  script:
    - echo "$GREETING $WHO from $CI_JOB_NAME ($CI_JOB_STAGE)"
ok:
  extends: [.base, .common]
  stage: build
  variables:
    JOB_VAR: job-value
  script:
    - !reference [.base, script]
    - echo "job var $JOB_VAR, included $INCLUDED, commit $CI_COMMIT_SHA on $CI_COMMIT_REF_NAME"
    - grep ^ID= /etc/os-release
    - cat tracked.txt untracked.txt
    - test ! -e ignored.log
    - mkdir -p out && echo artifact-content > out/result.txt
    - echo scribble >> tracked.txt
    - sleep 300 &
  after_script:
    - echo "after_script with $CI_JOB_STATUS"
  artifacts:
    paths: [out/]
fail:
  extends: .base
  script:
    - echo "about to fail"
    - exit 7
  after_script:
    - echo "after_script with $CI_JOB_STATUS"
`

const commonYAML = `
.common:
  variables:
    INCLUDED: from-include
`

type project struct {
	tree, data, artifacts, config, marker string
	user                                  testenv.User
}

// newProject makes a scratch git repo owned by u: a tracked file, an
// untracked one and an ignored one, and the pipeline with image line img.
func newProject(t *testing.T, u testenv.User, img, configExtra string) project {
	t.Helper()
	testenv.RequireBinary(t, "git")
	base := testenv.PrivateDir(t, u)
	tok := make([]byte, 8)
	_, _ = rand.Read(tok)
	p := project{
		tree: filepath.Join(base, "proj"), data: filepath.Join(base, "data"), artifacts: filepath.Join(base, "artifacts"),
		marker: "ci-exec-exec-test-" + hex.EncodeToString(tok), user: u,
	}
	require.NoError(t, os.MkdirAll(filepath.Join(p.tree, "ci"), 0o755))
	y := strings.ReplaceAll(strings.ReplaceAll(pipelineYAML, "@MARKER@", p.marker), "@IMAGE@", img)
	files := map[string]string{
		".gitlab-ci.yml": y, "ci/common.yml": commonYAML, ".gitignore": "*.log\n",
		"tracked.txt": "tracked\n",
	}
	for name, body := range files {
		require.NoError(t, os.WriteFile(filepath.Join(p.tree, name), []byte(body), 0o644))
	}
	git := func(args ...string) {
		cmd := exec.Command("git", append([]string{"-C", p.tree, "-c", "user.email=t@example.com", "-c", "user.name=t"}, args...)...)
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "git %v: %s", args, out)
	}
	git("init", "-q", "-b", "main")
	git("add", ".")
	git("commit", "-q", "-m", "init")
	require.NoError(t, os.WriteFile(filepath.Join(p.tree, "untracked.txt"), []byte("untracked\n"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(p.tree, "ignored.log"), []byte("ignored\n"), 0o644))
	cfg := fmt.Sprintf("[general]\ndata_dir = %q\nkill_timeout = \"5s\"\n%s\n", p.data+"/$USER", configExtra)
	p.config = testenv.WriteConfig(t, base, cfg)
	chownTree(t, base, u)
	return p
}

func chownTree(t *testing.T, dir string, u testenv.User) {
	t.Helper()
	require.NoError(t, filepath.WalkDir(dir, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(p, u.UID, u.GID)
	}))
}

// snapshot is every file of the tree (the .git dir too) with its mode and
// content.
func snapshot(t *testing.T, tree string) map[string]string {
	t.Helper()
	out := map[string]string{}
	require.NoError(t, filepath.WalkDir(tree, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(tree, p)
		v := fi.Mode().String()
		if fi.Mode().IsRegular() {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			v += " " + string(b)
		}
		out[rel] = v
		return nil
	}))
	return out
}

// files lists what is left under dir (regular files and symlinks).
func files(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			out = append(out, p)
		}
		return nil
	})
	sort.Strings(out)
	return out
}

// execJob runs `ci-exec --config <config> exec --artifacts-dir ... job` as
// the project's user, in the tree, and returns stdout, stderr and the exit
// code.
func (p project) execJob(t *testing.T, job string, extra ...string) (string, string, int) {
	t.Helper()
	args := append([]string{"--config", p.config, "exec", "--artifacts-dir", p.artifacts}, extra...)
	args = append(args, job)
	cmd := exec.Command(testenv.Driver(t), args...)
	cmd.Dir = p.tree
	cmd.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=" + filepath.Dir(p.tree),
		"USER=" + p.user.Name, "LANG=C.UTF-8"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: p.user.Credential()}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else {
		require.NoError(t, err)
	}
	t.Logf("ci-exec exec %s: exit %d\nstdout:\n%s\nstderr:\n%s", job, code, stdout.String(), stderr.String())
	return stdout.String(), stderr.String(), code
}

// assertNothingLeft checks that the job left no file in the data dir, no
// process, and the tree as it was.
func (p project) assertNothingLeft(t *testing.T, before map[string]string) {
	t.Helper()
	assert.Equal(t, before, snapshot(t, p.tree), "the working tree is as it was")
	assert.Empty(t, files(t, p.data), "no job files left in the data dir")
	for _, top := range []string{"builds", "scripts", "state"} {
		entries, _ := os.ReadDir(filepath.Join(p.data, p.user.Name, top))
		assert.Empty(t, entries, "no job dir left in %s", top)
	}
	assert.Empty(t, runnerdouble.ProcessesWithMarker(p.marker), "no process of the job left running")
}

func assertLines(t *testing.T, log string, lines ...string) {
	t.Helper()
	for _, l := range lines {
		assert.Contains(t, log, "\n"+l+"\n", "job log line %q", l)
	}
}

func TestExecOnHost(t *testing.T) {
	for _, u := range testenv.Users(t) {
		t.Run(u.Name, func(t *testing.T) {
			p := newProject(t, u, "", "")
			before := snapshot(t, p.tree)

			out, _, code := p.execJob(t, "ok")
			assert.Equal(t, 0, code)
			assertLines(t, out,
				`$ echo "before_script from default"`, "before_script from default",
				"hello world from ok (build)",
				"tracked", "untracked",
				"after_script with success",
				"Job succeeded")
			assert.Regexp(t, `\njob var job-value, included from-include, commit [0-9a-f]{40} on main\n`, out)
			b, err := os.ReadFile(filepath.Join(p.artifacts, "out", "result.txt"))
			require.NoError(t, err, "artifacts copied back")
			assert.Equal(t, "artifact-content\n", string(b))
			p.assertNothingLeft(t, before)

			out, _, code = p.execJob(t, "fail")
			assert.Equal(t, 7, code, "the script's exit code passes through")
			assertLines(t, out, "about to fail", "after_script with failed", "ERROR: Job failed: exit status 7")
			p.assertNothingLeft(t, before)

			// --var and --env-file win over the file's variables.
			env := filepath.Join(p.artifacts+"-env", "ci.env")
			require.NoError(t, os.MkdirAll(filepath.Dir(env), 0o755))
			require.NoError(t, os.WriteFile(env, []byte("# local values\nGREETING=hi\n"), 0o644))
			chownTree(t, filepath.Dir(env), u)
			out, _, code = p.execJob(t, "ok", "--var", "WHO=tester", "--env-file", env)
			assert.Equal(t, 0, code)
			assertLines(t, out, "hi tester from ok (build)")
			p.assertNothingLeft(t, before)
		})
	}
}

func TestExecInPlace(t *testing.T) {
	u := testenv.Unprivileged(t)
	p := newProject(t, u, "", "")
	// In the tree itself the job sees ignored files too; the job checks
	// that it does not.
	require.NoError(t, os.Remove(filepath.Join(p.tree, "ignored.log")))
	out, _, code := p.execJob(t, "ok", "--in-place")
	assert.Equal(t, 0, code)
	assertLines(t, out, "Running in the working tree "+p.tree+" (--in-place)", "Job succeeded")
	b, err := os.ReadFile(filepath.Join(p.tree, "out", "result.txt"))
	require.NoError(t, err, "the job wrote into the tree itself")
	assert.Equal(t, "artifact-content\n", string(b))
	b, err = os.ReadFile(filepath.Join(p.tree, "tracked.txt"))
	require.NoError(t, err)
	assert.Equal(t, "tracked\nscribble\n", string(b))
	_, err = os.Stat(p.artifacts)
	assert.True(t, os.IsNotExist(err), "nothing copied: the artifacts are in the tree")
	assert.Empty(t, files(t, p.data), "only the link to the tree went, and it is gone")
	assert.Empty(t, runnerdouble.ProcessesWithMarker(p.marker))
}

func TestExecWithSlurm(t *testing.T) {
	testenv.RequireBinary(t, "sbatch")
	u := testenv.Unprivileged(t)
	p := newProject(t, u, "", fmt.Sprintf("executor = \"slurm\"\n[batch]\noptions = [\"--partition=%s\"]\n",
		testenv.Fact(t, "CI_EXEC_TEST_SLURM_PARTITION")))
	before := snapshot(t, p.tree)
	out, _, code := p.execJob(t, "fail")
	assert.Equal(t, 7, code, "the batch job's exit code passes through")
	// One allocation per CI job (batch.allocate = "prepare", the default).
	assert.Regexp(t, `\nRunning ci-[0-9]+-build_script in Slurm allocation [0-9]+ \(ci-[0-9]+-alloc\); output is streamed below\.\n`, out)
	assertLines(t, out, "about to fail", "after_script with failed", "ERROR: Job failed: exit status 7")
	p.assertNothingLeft(t, before)
}

func TestExecListAndUsageErrors(t *testing.T) {
	u := testenv.Root(t)
	p := newProject(t, u, "image: docker.io/library/alpine:3.20", "")
	out, _, code := p.execJob(t, "--list")
	assert.Equal(t, 0, code)
	assert.Regexp(t, `(?m)^ok\s+build\s+docker.io/library/alpine:3.20$`, out)
	assert.Regexp(t, `(?m)^fail\s+test\s+docker.io/library/alpine:3.20$`, out)

	_, errOut, code := p.execJob(t, "nosuchjob")
	assert.Equal(t, 2, code)
	assert.Contains(t, errOut, `no job "nosuchjob" in the file`)
}

func TestExecInContainer(t *testing.T) {
	for _, rt := range []struct{ name, program, table string }{
		{"charliecloud", "ch-run", ""},
		{"apptainer", "apptainer", `application_path = "/opt/apptainer/bin"`},
	} {
		t.Run(rt.name, func(t *testing.T) {
			testenv.RequireBinary(t, rt.program)
			u := testenv.Unprivileged(t)
			image := testenv.Fact(t, "CI_EXEC_TEST_IMAGE_ANON")
			denied := testenv.Fact(t, "CI_EXEC_TEST_IMAGE_V2")
			storage := filepath.Join(testenv.PrivateDir(t, u), "images")
			require.NoError(t, os.Mkdir(storage, 0o755))
			require.NoError(t, os.Chown(storage, u.UID, u.GID))
			allow := strings.ReplaceAll(image, ".", `\.`)
			cfg := fmt.Sprintf("run_mechanism = %q\n[general.%s]\nimage_storage_dir = %q\nimage_allowlist = ['%s']\n%s\n",
				rt.name, rt.name, storage, allow, rt.table)
			p := newProject(t, u, "image: "+image, cfg)
			before := snapshot(t, p.tree)

			out, _, code := p.execJob(t, "ok")
			assert.Equal(t, 0, code)
			assertLines(t, out, "before_script from default", "hello world from ok (build)", "ID=citiny",
				"tracked", "untracked", "after_script with success", "Job succeeded")
			assert.Contains(t, out, "with "+rt.name)
			b, err := os.ReadFile(filepath.Join(p.artifacts, "out", "result.txt"))
			require.NoError(t, err)
			assert.Equal(t, "artifact-content\n", string(b))
			p.assertNothingLeft(t, before)

			out, _, code = p.execJob(t, "fail")
			assert.Equal(t, 7, code)
			assertLines(t, out, "about to fail", "ERROR: Job failed: exit status 7")
			p.assertNothingLeft(t, before)

			// An image outside the allowlist is refused as the runner's
			// job would be: a build failure in prepare, no script run.
			y, err := os.ReadFile(filepath.Join(p.tree, ".gitlab-ci.yml"))
			require.NoError(t, err)
			require.NoError(t, os.WriteFile(filepath.Join(p.tree, ".gitlab-ci.yml"), bytes.ReplaceAll(y, []byte(image), []byte(denied)), 0o644))
			before = snapshot(t, p.tree)
			out, _, code = p.execJob(t, "ok")
			assert.Equal(t, 1, code)
			assert.Contains(t, out, "is not allowed on this runner")
			assert.NotContains(t, out, "hello world")
			p.assertNothingLeft(t, before)
		})
	}
}
