package services

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParse(t *testing.T) {
	specs, err := Parse(`[{"name":"registry.example.org/db/postgres:16","alias":"db,pg","entrypoint":null,"command":["postgres","-c","fsync=off"],"variables":{"healthcheck_tcp_port":"5432","POSTGRES_PASSWORD":"x"}},
		{"name":"redis@sha256:abc","alias":"","entrypoint":["redis-server"],"command":null}]`, [][]int{{5432, 6000}, nil})
	require.NoError(t, err)
	require.Len(t, specs, 2)
	assert.Equal(t, []string{"db", "pg", "postgres"}, specs[0].Hosts)
	assert.Equal(t, "db", specs[0].Name())
	assert.Equal(t, []int{5432, 6000}, specs[0].Ports, "payload ports and HEALTHCHECK_TCP_PORT, once each")
	assert.Equal(t, []string{"postgres", "-c", "fsync=off"}, specs[0].Argv())
	assert.Equal(t, []string{"redis"}, specs[1].Hosts)
	assert.Empty(t, specs[1].Ports)
	assert.Equal(t, []string{"redis-server"}, specs[1].Argv())

	two, err := Parse(`[{"name":"x/web","alias":"a"},{"name":"x/web","alias":"b"}]`, nil)
	require.NoError(t, err)
	assert.Equal(t, []string{"a", "web"}, two[0].Hosts)
	assert.Equal(t, []string{"b"}, two[1].Hosts, "the derived name is the first service's")

	none, err := Parse("", nil)
	require.NoError(t, err)
	assert.Empty(t, none)

	for doc, want := range map[string]string{
		`not json`:                          "is not the runner's list of services",
		`[{"name":""}]`:                     "has no image name",
		`[{"name":"a","alias":"bad_name"}]`: `alias "bad_name" is not a host name`,
		`[{"name":"x/web","alias":"a"},{"name":"y/b","alias":"a"}]`:  `both called "a"`,
		`[{"name":"x/web"},{"name":"y/web"}]`:                        `services[1] (y/web) has no host name of its own`,
		`[{"name":"a","variables":{"HEALTHCHECK_TCP_PORT":"http"}}]`: "is not a TCP port",
	} {
		_, err := Parse(doc, nil)
		require.Error(t, err, doc)
		assert.Contains(t, err.Error(), want, doc)
	}
}

func TestHostsFile(t *testing.T) {
	got := string(HostsFile([]byte("127.0.0.1 localhost\n10.0.0.1 login1"), []Spec{{Hosts: []string{"web", "tiny"}}, {Hosts: []string{"db"}}}))
	assert.Equal(t, "127.0.0.1 localhost\n10.0.0.1 login1\n# ci-exec: the job's services\n127.0.0.1\tlocalhost web tiny db\n::1\tlocalhost ip6-localhost\n", got)
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func busybox(t *testing.T) string {
	for _, p := range []string{"/bin/busybox", "/usr/bin/busybox"} {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	t.Fatal("busybox is missing (scripts/test-env.sh installs busybox-static)")
	return ""
}

// TestStartWaitStop runs a real server (busybox httpd) as a service: Wait
// returns once it listens, its port is then not free, and Stop leaves
// nothing of it.
func TestStartWaitStop(t *testing.T) {
	bb := busybox(t)
	dir := t.TempDir()
	port := freePort(t)
	r, err := Start([]string{bb, "httpd", "-f", "-p", strconv.Itoa(port), "-h", dir}, []string{"PATH=/usr/bin:/bin"}, dir, filepath.Join(dir, "log"))
	require.NoError(t, err)
	defer r.Stop(time.Second)
	r.Ports = []int{port}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	require.NoError(t, r.Wait(ctx))
	var taken *PortTakenError
	require.ErrorAs(t, CheckFree([]int{port}), &taken)
	assert.Equal(t, port, taken.Port)
	c, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(port))
	require.NoError(t, err, "it accepts connections")
	c.Close()

	assert.Empty(t, r.Stop(5*time.Second))
	assert.False(t, r.Alive())
	assert.Empty(t, r.processes(), "nothing of the service is left")
	assert.NoError(t, CheckFree([]int{port}))
}

// TestWaitTellsOthersApart: a port someone else listens on is a clash, not
// readiness; a service that exits is ErrExited with its output kept.
func TestWaitTellsOthersApart(t *testing.T) {
	bb := busybox(t)
	dir := t.TempDir()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	port := l.Addr().(*net.TCPAddr).Port
	// A service that never listens.
	r, err := Start([]string{bb, "sleep", "1000"}, nil, dir, filepath.Join(dir, "log"))
	require.NoError(t, err)
	defer r.Stop(time.Second)
	r.Ports = []int{port}
	var taken *PortTakenError
	require.ErrorAs(t, r.Wait(context.Background()), &taken)

	ex, err := Start([]string{bb, "sh", "-c", "echo cannot-start >&2; exit 3"}, nil, dir, filepath.Join(dir, "log2"))
	require.NoError(t, err)
	ex.Ports = []int{freePort(t)}
	err = ex.Wait(context.Background())
	assert.True(t, errors.Is(err, ErrExited), "%v", err)
	assert.Equal(t, []string{"cannot-start"}, ex.LastLines(5))
	assert.True(t, strings.HasSuffix(ex.Log, "log2"))
}

// TestStopSparesAReusedPID: a record whose PID now names another process
// (the service ended long ago, the PID was handed out again) stops
// nothing.
func TestStopSparesAReusedPID(t *testing.T) {
	bb := busybox(t)
	dir := t.TempDir()
	other, err := Start([]string{bb, "sleep", "1000"}, nil, dir, filepath.Join(dir, "log"))
	require.NoError(t, err)
	defer other.Stop(time.Second)
	stale := other
	stale.StartTime--
	assert.False(t, stale.Alive())
	assert.Empty(t, stale.Stop(time.Second))
	assert.True(t, other.Alive(), "the newer process with that PID still runs")
}
