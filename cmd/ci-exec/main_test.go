package main

import (
	"bytes"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestHelp(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"help"}, "Commands for people"},
		{[]string{"--help"}, "Commands for people"},
		{[]string{"help", "exec"}, "ci-exec exec --list"},
		{[]string{"exec", "--help"}, "ci-exec exec --list"},
		{[]string{"help", "check"}, "ci-exec check --json"},
		{[]string{"check", "--help"}, "ci-exec check --json"},
		{[]string{"help", "prepare"}, "called by gitlab-runner"},
	} {
		var out, errOut bytes.Buffer
		code := run(tc.args, &out, &errOut)
		assert.Equal(t, 0, code, "%v", tc.args)
		assert.Contains(t, out.String()+errOut.String(), tc.want, "%v", tc.args)
		assert.Contains(t, out.String()+errOut.String(), "Examples", "%v", tc.args)
	}
	var out, errOut bytes.Buffer
	assert.NotEqual(t, 0, run([]string{"help", "nope"}, &out, &errOut))
	assert.Contains(t, errOut.String(), `unknown command "nope"`)
}
