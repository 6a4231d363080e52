package runnerscript

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestRedactCapturedScripts(t *testing.T) {
	bash := bashPath(t)
	for name, in := range capturedScripts(t) {
		t.Run(name, func(t *testing.T) {
			out := Redact(in, []string{capturedToken, capturedSecret})
			assert.NotContains(t, string(out), capturedToken)
			assert.NotContains(t, string(out), capturedSecret)
			if strings.Contains(string(in), capturedSecret) {
				assert.Contains(t, string(out), "export DEMO_SECRET="+Masked)
			}
			// The kept copy stays a readable script of the same shape.
			res, err := Rewrite(out, nil)
			require.NoError(t, err)
			require.NoError(t, Check(context.Background(), bash, out, res.Bodies, nil))
		})
	}
}

func TestRedactQuotedSecrets(t *testing.T) {
	const odd = "p@ss'wo\\rd $x \"y\" é"
	for _, q := range []quoting{ansiC, posix} {
		in := script(q, false, export(q, "MY_SECRET", odd), `printf '%s' `+q.quote(odd)+` > "/x.tmp/F"`, "echo done")
		require.NotContains(t, string(in), odd, "the secret is quoted twice in the script")
		out := Redact(in, []string{odd})
		for _, form := range []string{odd, q.inner(odd), q.inner(q.inner(odd))} {
			assert.NotContains(t, string(out), form, "quoting %d", q)
		}
		res, err := Rewrite(out, nil)
		require.NoError(t, err)
		require.Len(t, res.Bodies, 1)
		assert.NotContains(t, res.Bodies[0], odd)
		assert.Equal(t, 2, strings.Count(string(out), Masked))
	}
	assert.Equal(t, "short x", string(Redact([]byte("short x"), []string{"short"})), "short values are not masked")
}

func TestRedactFile(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "build_script.bash")
	require.NoError(t, os.WriteFile(p, []byte("export T="+capturedToken+"\n"), 0o700))
	require.NoError(t, RedactFile(p, []string{capturedToken}))
	b, err := os.ReadFile(p)
	require.NoError(t, err)
	assert.Equal(t, "export T="+Masked+"\n", string(b))
	fi, err := os.Stat(p)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())

	// A file without secrets is still made private.
	q := filepath.Join(dir, "out")
	require.NoError(t, os.WriteFile(q, []byte("nothing here\n"), 0o644))
	require.NoError(t, os.Chmod(q, 0o644))
	require.NoError(t, RedactFile(q, []string{capturedToken}))
	fi, err = os.Stat(q)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	ents, _ := os.ReadDir(dir)
	assert.Len(t, ents, 2, "no temp file left behind")
}
