package host

import (
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/ci-exec/ci-exec/internal/mechanism"
)

func TestCommand(t *testing.T) {
	spec := mechanism.RunSpec{Argv: []string{"/s/build_script.bash"}, Env: []string{"A=1"}}
	argv, env, err := New("", false).Command(spec)
	assert.NoError(t, err)
	assert.Equal(t, []string{"/bin/bash", "--noprofile", "--norc", "/s/build_script.bash"}, argv)
	assert.Equal(t, []string{"A=1"}, env)

	argv, _, err = New("/opt/bash/bin/bash", true).Command(spec)
	assert.NoError(t, err)
	assert.Equal(t, []string{"/opt/bash/bin/bash", "--login", "/s/build_script.bash"}, argv, "login_shell")

	_, _, err = New("", false).Command(mechanism.RunSpec{})
	assert.Error(t, err)
}
