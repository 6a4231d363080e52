package stages

import (
	"bytes"
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/ci-exec/ci-exec/internal/joblog"
)

// A pass_env value that is a masked variable's value must not show in the
// logged container command, even when quoting it would split it.
func TestLogCommandMasksQuotedSecrets(t *testing.T) {
	var buf bytes.Buffer
	log := joblog.New(&buf)
	const quoted = "it's-a-s3cret value"
	const plain = "glcbt-64_plain-secret"
	log.AddSecrets(quoted, plain)
	LogCommand(log, "cmd_build_script", "Running build_script", []string{"ch-run", "img", "--", "/bin/sh", "/s/build_script.bash"},
		[]string{"HOME=/home/u", "PROXY_PASSWORD=" + quoted, "TOKEN=" + plain})
	out := buf.String()
	assert.NotContains(t, out, "s3cret")
	assert.NotContains(t, out, "plain-secret")
	assert.Contains(t, out, "env -i HOME=/home/u 'PROXY_PASSWORD=[MASKED]' 'TOKEN=[MASKED]' ch-run img -- /bin/sh /s/build_script.bash")
}
