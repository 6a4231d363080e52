package audit

import (
	"context"
	"encoding/json"
	"log/syslog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var rec = Record{Stage: "prepare", Server: "https://gitlab.example", Project: "hpc/app", PipelineID: "9", JobID: 77,
	Login: "alice", User: "alice", UID: 1234, Decision: "allow", Reason: "user_login", Image: "reg/img:1", Digest: "sha256:ab", Exit: 0}

func TestJSONLinesFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "audit.jsonl")
	for i := 0; i < 2; i++ {
		l, err := Open(p)
		require.NoError(t, err)
		l.Write(context.Background(), rec)
		require.NoError(t, l.Close())
	}
	fi, err := os.Stat(p)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	b, err := os.ReadFile(p)
	require.NoError(t, err)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	require.Len(t, lines, 2, "records are appended, one per line")
	var m map[string]any
	require.NoError(t, json.Unmarshal([]byte(lines[1]), &m))
	assert.Equal(t, "alice", m["gitlab_user"])
	assert.EqualValues(t, 1234, m["uid"])
	assert.EqualValues(t, 77, m["job_id"])
	assert.Equal(t, "sha256:ab", m["digest"])
	assert.Equal(t, "allow", m["decision"])
}

func TestSyslog(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "log")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	require.NoError(t, err)
	defer conn.Close()
	old := syslogDial
	syslogDial = func() (*syslog.Writer, error) {
		return syslog.Dial("unixgram", sock, syslog.LOG_AUTHPRIV|syslog.LOG_INFO, "ci-exec")
	}
	t.Cleanup(func() { syslogDial = old })
	l, err := Open("syslog")
	require.NoError(t, err)
	r := rec
	r.Decision, r.Reason = "deny", "the account is in auth.user_blocklist"
	l.Write(context.Background(), r)
	require.NoError(t, l.Close())
	buf := make([]byte, 4096)
	n, err := conn.Read(buf)
	require.NoError(t, err)
	msg := string(buf[:n])
	assert.Regexp(t, `^<84>`, msg, "authpriv.warning for a denial") // facility 10*8 + severity 4
	assert.Contains(t, msg, "ci-exec")
	assert.Contains(t, msg, `"decision":"deny"`)
	assert.Contains(t, msg, `"reason":"the account is in auth.user_blocklist"`)
}

func TestUnreachableSyslogSaysWhatToDo(t *testing.T) {
	old := syslogDial
	syslogDial = func() (*syslog.Writer, error) {
		return syslog.Dial("unixgram", filepath.Join(t.TempDir(), "none"), syslog.LOG_AUTHPRIV, "ci-exec")
	}
	t.Cleanup(func() { syslogDial = old })
	_, err := Open("syslog")
	require.Error(t, err)
	assert.Contains(t, err.Error(), `audit_log = "/var/log/ci-exec/audit.jsonl"`)
}
