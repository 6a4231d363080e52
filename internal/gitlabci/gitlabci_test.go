package gitlabci

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func writeFiles(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, body := range files {
		p := filepath.Join(dir, name)
		require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		require.NoError(t, os.WriteFile(p, []byte(body), 0o644))
	}
	return dir
}

func load(t *testing.T, files map[string]string) *Config {
	t.Helper()
	c, err := Load(writeFiles(t, files), "")
	require.NoError(t, err)
	return c
}

const pipeline = `
include:
  - local: ci/common.yml
  - ci/more-*.yml
  - remote: https://example.com/x.yml

variables:
  GLOBAL: g
  OVERRIDDEN: global
  DEEP: "$GLOBAL-deep"
  LITERAL:
    value: "$NOT_EXPANDED"
    expand: false

default:
  image: docker.io/library/alpine:3.20
  before_script:
    - echo default-before
  timeout: 1h 30m

.base: &base
  variables:
    BASE: b
  script:
    - echo base
  after_script: [echo after]

.more:
  extends: .base
  variables:
    MORE: m

.setup:
  script:
    - echo setup-1
    - echo setup-2

build:
  extends: [.more, .from-include]
  stage: build
  variables:
    OVERRIDDEN: job
    VERSION: 1.10
  script:
    - !reference [.setup, script]
    - echo "build $VERSION"
  rules:
    - if: $CI_COMMIT_BRANCH
  artifacts:
    paths: [out/]

image-map:
  <<: *base
  image:
    name: registry.example/img:1
    entrypoint: [""]
  before_script: []
  timeout: 10 minutes

.hidden:
  script: [echo hidden]

plain:
  inherit:
    default: false
    variables: [GLOBAL]
  script: echo plain
`

func TestResolvePipeline(t *testing.T) {
	c := load(t, map[string]string{
		".gitlab-ci.yml": pipeline,
		"ci/common.yml": `
.from-include:
  variables:
    INCLUDED: yes
    OVERRIDDEN: include
  before_script: [echo from-include]
`,
		"ci/more-a.yml": "variables:\n  FROM_GLOB: a\n",
	})
	assert.Equal(t, []string{"build", "image-map", "plain"}, c.JobNames())
	require.Len(t, c.Notes, 1)
	assert.Contains(t, c.Notes[0], "include: remote is not fetched")

	b, err := c.Job("build")
	require.NoError(t, err)
	assert.Equal(t, "build", b.Stage)
	assert.Equal(t, "docker.io/library/alpine:3.20", b.Image.Name, "image from default:")
	assert.Equal(t, []string{"echo from-include"}, b.BeforeScript, "extends: wins over default:")
	assert.Equal(t, []string{"echo setup-1", "echo setup-2", `echo "build $VERSION"`}, b.Script, "!reference spliced")
	assert.Equal(t, []string{"echo after"}, b.AfterScript, "nested extends")
	assert.Equal(t, 90*time.Minute, b.Timeout)
	assert.Equal(t, []string{"out/"}, b.ArtifactPaths)
	vars := map[string]Variable{}
	var order []string
	for _, v := range b.Variables {
		vars[v.Key] = v
		order = append(order, v.Key)
	}
	assert.Equal(t, "job", vars["OVERRIDDEN"].Value)
	assert.Equal(t, "1.10", vars["VERSION"].Value, "a number as written")
	assert.Equal(t, "yes", vars["INCLUDED"].Value)
	assert.Equal(t, "b", vars["BASE"].Value)
	assert.Equal(t, "m", vars["MORE"].Value)
	assert.Equal(t, "a", vars["FROM_GLOB"].Value)
	assert.True(t, vars["LITERAL"].Raw)
	assert.Equal(t, "$NOT_EXPANDED", vars["LITERAL"].Value)
	assert.Equal(t, []string{"FROM_GLOB", "GLOBAL", "OVERRIDDEN", "DEEP", "LITERAL"}, order[:5], "globals first: included ones, then the file's, in order")
	require.Len(t, b.Notes, 1)
	assert.Contains(t, b.Notes[0], "rules: is not evaluated")
	assert.Contains(t, b.Notes[0], ".gitlab-ci.yml:")

	im, err := c.Job("image-map")
	require.NoError(t, err)
	assert.Equal(t, "registry.example/img:1", im.Image.Name)
	assert.Equal(t, []string{""}, im.Image.Entrypoint)
	assert.Empty(t, im.BeforeScript, "an empty before_script: overrides default:")
	assert.Equal(t, []string{"echo base"}, im.Script, "merge key <<")
	assert.Equal(t, 10*time.Minute, im.Timeout)

	p, err := c.Job("plain")
	require.NoError(t, err)
	assert.Equal(t, "", p.Image.Name, "inherit: default: false")
	assert.Empty(t, p.BeforeScript)
	assert.Equal(t, []Variable{{Key: "GLOBAL", Value: "g"}}, p.Variables)
	assert.Equal(t, []string{"echo plain"}, p.Script)
}

func TestErrorsNameFileLineAndKey(t *testing.T) {
	for name, tc := range map[string]struct {
		files map[string]string
		job   string
		want  string
	}{
		"unknown keyword": {map[string]string{".gitlab-ci.yml": "a:\n  script: [x]\n  scrpit: [y]\n"}, "a",
			".gitlab-ci.yml:3: a: unknown job keyword scrpit"},
		"extends unknown": {map[string]string{".gitlab-ci.yml": "a:\n  extends: .nope\n  script: [x]\n"}, "a",
			"extends: .nope is not a job"},
		"extends loop": {map[string]string{".gitlab-ci.yml": ".x:\n  extends: .y\n.y:\n  extends: .x\na:\n  extends: .x\n  script: [x]\n"}, "a",
			"loops back"},
		"reference missing": {map[string]string{".gitlab-ci.yml": "a:\n  script: !reference [.nope, script]\n"}, "a",
			".gitlab-ci.yml:2: !reference [.nope script]: no .nope in the file"},
		"no script": {map[string]string{".gitlab-ci.yml": "a:\n  image: x\n"}, "a", "a has no script:"},
		"trigger":   {map[string]string{".gitlab-ci.yml": "a:\n  trigger: other/project\n"}, "a", "trigger job"},
		"bad timeout": {map[string]string{".gitlab-ci.yml": "a:\n  timeout: soon\n  script: [x]\n"}, "a",
			".gitlab-ci.yml:2: a: timeout: \"soon\" is not a duration"},
		"no job": {map[string]string{".gitlab-ci.yml": "a:\n  script: [x]\n"}, "b", `no job "b"`},
		"missing include": {map[string]string{".gitlab-ci.yml": "include: nope.yml\na:\n  script: [x]\n"}, "",
			".gitlab-ci.yml:1: nope.yml does not exist"},
		"include loop": {map[string]string{".gitlab-ci.yml": "include: b.yml\n", "b.yml": "include: .gitlab-ci.yml\n"}, "",
			"includes must not form a loop"},
		"yaml syntax": {map[string]string{".gitlab-ci.yml": "a:\n  script: [x\n"}, "", ".gitlab-ci.yml"},
	} {
		t.Run(name, func(t *testing.T) {
			c, err := Load(writeFiles(t, tc.files), "")
			if err == nil && tc.job != "" {
				_, err = c.Job(tc.job)
			}
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
			assert.False(t, strings.Contains(err.Error(), "\n"), "one line: %q", err)
		})
	}
}

func TestMatrixVars(t *testing.T) {
	c := load(t, map[string]string{".gitlab-ci.yml": "a:\n  parallel:\n    matrix:\n      - ARCH: [x86, arm]\n        OS: linux\n  script: [x]\n"})
	j, err := c.Job("a")
	require.NoError(t, err)
	assert.Equal(t, []string{"ARCH", "OS"}, j.MatrixVars)
}

func TestParseDuration(t *testing.T) {
	for in, want := range map[string]time.Duration{
		"1h 30m": 90 * time.Minute, "90 minutes": 90 * time.Minute, "2h30m": 150 * time.Minute,
		"3600": time.Hour, "1 day": 24 * time.Hour, "1 hour and 5 mins": 65 * time.Minute, "30s": 30 * time.Second,
	} {
		got, err := ParseDuration(in)
		require.NoError(t, err, in)
		assert.Equal(t, want, got, in)
	}
	for _, in := range []string{"", "soon", "5 parsecs", "h"} {
		_, err := ParseDuration(in)
		assert.Error(t, err, in)
	}
}
