package localjob

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/gitlabci"
	"github.com/ci-exec/ci-exec/internal/jobscript"
)

func TestExpandAsTheRunner(t *testing.T) {
	got := expand([]jobscript.Variable{
		{Key: "A", Value: "a"},
		{Key: "B", Value: "$A-${A}-$UNSET-b"},
		{Key: "RAW", Value: "$A", Raw: true},
		{Key: "A", Value: "a2"},
	})
	assert.Equal(t, "a2-a2--b", got[1].Value, "last value wins, unset is empty")
	assert.Equal(t, "$A", got[2].Value, "expand: false is kept as written")
}

func TestImageNameExpanded(t *testing.T) {
	r := &run{job: &gitlabci.Job{Image: gitlabci.Image{Name: "$REG/tools:${TAG}"},
		Variables: []gitlabci.Variable{{Key: "REG", Value: "registry.example"}, {Key: "TAG", Value: "1"}}},
		opt: Options{Vars: []gitlabci.Variable{{Key: "TAG", Value: "2"}}}}
	assert.Equal(t, "registry.example/tools:2", r.image(), "--var wins over the file")
}

func TestSlug(t *testing.T) {
	assert.Equal(t, "feature-my-branch", slug("Feature/My_Branch"))
	assert.Equal(t, "x", slug("--x--"))
}

func TestArtifactGlobs(t *testing.T) {
	root := t.TempDir()
	for _, f := range []string{"out/a.txt", "out/sub/b.log", "c.log", "d/e/f.log"} {
		require.NoError(t, os.MkdirAll(filepath.Dir(filepath.Join(root, f)), 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(root, f), nil, 0o644))
	}
	for pat, want := range map[string][]string{
		"out/":      {"out"},
		"out":       {"out"},
		"*.log":     {"c.log"},
		"**/*.log":  {"c.log", "d/e/f.log", "out/sub/b.log"},
		"out/**":    {"out"}, // ** matches no dir too: out itself, whole
		"none/*":    nil,
		"out/sub/*": {"out/sub/b.log"},
	} {
		got, err := globArtifacts(root, filepath.Clean(pat))
		require.NoError(t, err)
		assert.ElementsMatch(t, want, got, pat)
	}
}

func TestReadEnvFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "ci.env")
	require.NoError(t, os.WriteFile(p, []byte("# comment\n\nA=1\nexport B=\"two words\"\nC=\n"), 0o600))
	vs, err := readEnvFile(p)
	require.NoError(t, err)
	assert.Equal(t, []gitlabci.Variable{{Key: "A", Value: "1"}, {Key: "B", Value: `"two words"`}, {Key: "C"}}, vs)
	require.NoError(t, os.WriteFile(p, []byte("A=1\nnot a var\n"), 0o600))
	_, err = readEnvFile(p)
	assert.ErrorContains(t, err, "ci.env:2: write NAME=VALUE")
}
