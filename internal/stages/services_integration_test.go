package stages_test

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/runnerdouble"
	"github.com/ci-exec/ci-exec/internal/testenv"
)

// freePort is a TCP port nothing listens on right now.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// webService is the busybox test image serving its /etc with httpd on
// port, as the job's service with alias web; marker is in its
// environment, so its processes can be found.
func webService(t *testing.T, port int, marker string) runnerdouble.Service {
	p := strconv.Itoa(port)
	return runnerdouble.Service{
		Name:      testenv.Fact(t, "CI_EXEC_TEST_IMAGE"),
		Alias:     "web",
		Command:   []string{"httpd", "-f", "-v", "-p", p, "-h", "/etc"},
		Variables: map[string]string{"HEALTHCHECK_TCP_PORT": p, "SERVICE_MARKER": marker},
	}
}

// TestServices: a job's service (busybox httpd, alias web) is started in
// prepare with the job's runtime, the job's script fetches
// http://web:PORT/ from inside its own container, and no process of the
// service is left after the job, after a cancel and after a timeout.
func TestServices(t *testing.T) {
	forEachRuntimeAndUser(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		e := containerRunner(t, rt, u, "", `pull_policy = "if-not-present"`)
		job := func(marker string, port int) runnerdouble.Job {
			j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
			j.Services = []runnerdouble.Service{webService(t, port, marker)}
			return j
		}
		t.Run("reachable", func(t *testing.T) {
			marker := fmt.Sprintf("CI_EXEC_SVC_%d", time.Now().UnixNano())
			port, port2 := freePort(t), freePort(t)
			j := job(marker, port)
			// A second service of the same image: started after the first,
			// whose process the second's pull must leave alone.
			web2 := webService(t, port2, marker)
			web2.Alias = "web2"
			j.Services = append(j.Services, web2)
			j.Variables = map[string]string{"CI_DEBUG_SERVICES": "true"}
			j.Script = []string{fmt.Sprintf("wget -q -O - http://web:%d/os-release", port), fmt.Sprintf("wget -q -O - http://tiny:%d/os-release | grep VERSION_ID", port),
				fmt.Sprintf("wget -q -O - http://web2:%d/os-release | grep PRETTY_NAME", port2)}
			res := runJob(t, e.runner, j)
			require.True(t, res.Succeeded(), res.Error)
			assert.Contains(t, res.Log, fmt.Sprintf("Service web (%s) is listening on port %d; reach it as web, tiny.", j.Services[0].Name, port))
			assert.Contains(t, res.Log, "\nID=citiny\n", "the job reached the service at its alias")
			assert.Contains(t, res.Log, "\nVERSION_ID=1\n", "and at its image's name")
			assert.Contains(t, res.Log, "\nPRETTY_NAME=", "the second service too")
			assert.Contains(t, res.Log, "[service:web] ", "CI_DEBUG_SERVICES puts the service's output in the job log")
			noProcessWith(t, marker)
		})
		t.Run("cancel", func(t *testing.T) {
			marker := fmt.Sprintf("CI_EXEC_SVC_%d", time.Now().UnixNano())
			j := job(marker, freePort(t))
			j.Script = []string{`echo job-is-running`, `sleep 1000`}
			j.CancelOnLog = "job-is-running"
			res := runJob(t, e.runner, j)
			assert.Equal(t, runnerdouble.InternalReasonJobCanceled, res.InternalFailureReason)
			noProcessWith(t, marker)
		})
		t.Run("timeout", func(t *testing.T) {
			marker := fmt.Sprintf("CI_EXEC_SVC_%d", time.Now().UnixNano())
			j := job(marker, freePort(t))
			j.Timeout = 6 * time.Second
			j.Script = []string{`sleep 1000`}
			res := runJob(t, e.runner, j)
			assert.Equal(t, runnerdouble.ReasonJobExecutionTimeout, res.FailureReason)
			noProcessWith(t, marker)
		})
	}, runsServices)
}

// TestServiceFailures: a port another process holds (as another job's
// service would) and a service that exits are clear build failures, and
// nothing is left.
func TestServiceFailures(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		e := containerRunner(t, rt, u, "", "pull_policy = \"if-not-present\"\n[services]\nwait_timeout = \"20s\"")
		t.Run("port taken", func(t *testing.T) {
			l, err := net.Listen("tcp", "127.0.0.1:0")
			require.NoError(t, err)
			defer l.Close()
			port := l.Addr().(*net.TCPAddr).Port
			marker := fmt.Sprintf("CI_EXEC_SVC_%d", time.Now().UnixNano())
			j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
			j.Services = []runnerdouble.Service{webService(t, port, marker)}
			j.Script = []string{"echo must-not-run"}
			res := runJob(t, e.runner, j)
			assertUserFailure(t, res, fmt.Sprintf("service web: port %d is already in use on this host by a process that is not this job's service", port))
			assert.Empty(t, res.RunStages())
			noProcessWith(t, marker)
		})
		t.Run("two jobs, one port", func(t *testing.T) {
			port := freePort(t)
			markerA := fmt.Sprintf("CI_EXEC_SVC_A_%d", time.Now().UnixNano())
			cancelA := make(chan struct{})
			a := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
			a.Services = []runnerdouble.Service{webService(t, port, markerA)}
			a.Script = []string{"sleep 1000"}
			a.Cancel = cancelA
			type out struct {
				res *runnerdouble.Result
				err error
			}
			done := make(chan out, 1)
			go func() { r, err := runJobErr(t, e.runner, a); done <- out{r, err} }()
			// Job A's service is up once something accepts on its port.
			require.Eventually(t, func() bool {
				c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
				if err == nil {
					c.Close()
				}
				return err == nil
			}, 60*time.Second, 50*time.Millisecond)

			markerB := fmt.Sprintf("CI_EXEC_SVC_B_%d", time.Now().UnixNano())
			b := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
			// Another job of the runner: its own id and concurrency slot.
			b.ID, b.ConcurrentID = 2, 1
			b.Services = []runnerdouble.Service{webService(t, port, markerB)}
			b.Script = []string{"echo must-not-run"}
			res := runJob(t, e.runner, b)
			assertUserFailure(t, res, fmt.Sprintf("service web: port %d is already in use on this host", port))
			noProcessWith(t, markerB)

			close(cancelA)
			o := <-done
			require.NoError(t, o.err)
			assert.Equal(t, runnerdouble.InternalReasonJobCanceled, o.res.InternalFailureReason)
			noProcessWith(t, markerA)
		})
		t.Run("never listens", func(t *testing.T) {
			e := containerRunner(t, rt, u, "", "pull_policy = \"if-not-present\"\n[services]\nwait_timeout = \"2s\"")
			marker := fmt.Sprintf("CI_EXEC_SVC_%d", time.Now().UnixNano())
			port := freePort(t)
			svc := webService(t, port, marker)
			svc.Command = []string{"sh", "-c", "echo starting-slowly; exec sleep 1000"}
			j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
			j.Services = []runnerdouble.Service{svc}
			j.Script = []string{"echo must-not-run"}
			res := runJob(t, e.runner, j)
			assertUserFailure(t, res, fmt.Sprintf("service web did not listen on port %d within 2s (services.wait_timeout); its last output: starting-slowly", port))
			assert.Empty(t, res.RunStages())
			noProcessWith(t, marker)
		})
		t.Run("exits", func(t *testing.T) {
			marker := fmt.Sprintf("CI_EXEC_SVC_%d", time.Now().UnixNano())
			svc := webService(t, freePort(t), marker)
			svc.Command = []string{"sh", "-c", "echo no-config-found >&2; exit 3"}
			j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
			j.Services = []runnerdouble.Service{svc}
			j.Script = []string{"echo must-not-run"}
			res := runJob(t, e.runner, j)
			assertUserFailure(t, res, "service web exited before it listened on port", "its last output: no-config-found")
			assert.Empty(t, res.RunStages())
			noProcessWith(t, marker)
		})
	}, runsServices)
}

// TestServicesDownscoped: under a root runner that runs every stage as the
// job's user, the service runs as that user, survives the privileged
// front of prepare (which ends what a stage leaves behind, but not the
// services the stage names) and is stopped by cleanup.
func TestServicesDownscoped(t *testing.T) {
	for _, rt := range runtimes(t) {
		if !runsServices(rt) {
			continue
		}
		t.Run(rt.name, func(t *testing.T) {
			testenv.RequireBinary(t, rt.program)
			e := authRunner(t, &rt, "", "")
			u := testenv.Unprivileged(t)
			marker := fmt.Sprintf("CI_EXEC_SVC_%d", time.Now().UnixNano())
			port := freePort(t)
			tj := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
			j := e.job(t, u.Name, nil)
			j.Image, j.Registry, j.Token = tj.Image, tj.Registry, tj.Token
			j.Services = []runnerdouble.Service{webService(t, port, marker)}
			j.Script = []string{fmt.Sprintf("wget -q -O - http://web:%d/os-release", port)}
			res := runJob(t, e.runner, j)
			require.True(t, res.Succeeded(), res.Error)
			assert.Contains(t, res.Log, "\nID=citiny\n")
			noProcessWith(t, marker)
		})
	}
}

// TestServicesOfAKilledAttempt: a prepare killed after starting a service
// (no chance to stop it) leaves it in the job's state; the retried prepare
// stops it before starting its own, which would find the port taken.
func TestServicesOfAKilledAttempt(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		e := containerRunner(t, rt, u, "", `pull_policy = "if-not-present"`)
		oldMarker := fmt.Sprintf("CI_EXEC_OLD_%d", time.Now().UnixNano())
		old := exec.Command("sleep", "1000")
		old.Env = []string{"OLD_MARKER=" + oldMarker}
		old.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Credential: u.Credential()}
		require.NoError(t, old.Start())
		go func() { _ = old.Wait() }() // reaped when cleanup ends it
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", old.Process.Pid))
		require.NoError(t, err)
		f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
		start := f[19]
		stateDir := filepath.Dir(e.data)
		require.NoError(t, os.MkdirAll(stateDir, 0o755))
		require.NoError(t, os.Chown(stateDir, u.UID, u.GID))
		for _, part := range []string{u.Name, "state", "t3stt0k3n", "000", "1"} {
			stateDir = filepath.Join(stateDir, part)
			require.NoError(t, os.MkdirAll(stateDir, 0o700))
			require.NoError(t, os.Chown(stateDir, u.UID, u.GID))
		}
		state := fmt.Sprintf(`{"mechanism":%q,"services":[{"run":{"name":"old","hosts":["old"],"image":"x","pid":%d,"start_time":%s,"log":"/dev/null"},"image":{"ref":"x","handle":"/nonexistent","format":"x","shell":"/bin/sh","ready_time":0}}]}`,
			rt.name, old.Process.Pid, start)
		require.NoError(t, os.WriteFile(filepath.Join(stateDir, "state.json"), []byte(state), 0o600))
		require.NoError(t, os.Chown(filepath.Join(stateDir, "state.json"), u.UID, u.GID))

		marker := fmt.Sprintf("CI_EXEC_SVC_%d", time.Now().UnixNano())
		port := freePort(t)
		j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
		j.Services = []runnerdouble.Service{webService(t, port, marker)}
		j.Script = []string{fmt.Sprintf("wget -q -O - http://web:%d/os-release", port)}
		res := runJob(t, e.runner, j)
		require.True(t, res.Succeeded(), res.Error)
		assert.Contains(t, res.Log, "Stopping the services of an earlier attempt of this prepare.")
		noProcessWith(t, oldMarker)
		noProcessWith(t, marker)
	}, runsServices)
}

// runsServices selects the runtimes that run a job's services.
func runsServices(rt runtimeFixture) bool { return rt.services }

// TestServicesRefusedWhereUnsupported: a runtime that cannot run services
// (Podman, for now) refuses a job with services: as the user's build
// failure, before it pulls anything or runs a stage; it never drops them.
func TestServicesRefusedWhereUnsupported(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		e := containerRunner(t, rt, u, "", "")
		j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
		j.Services = []runnerdouble.Service{webService(t, freePort(t), "CI_EXEC_UNUSED")}
		j.Script = []string{"echo ran-anyway-$((1+1))"}
		res := runJob(t, e.runner, j)
		assertUserFailure(t, res, "cannot run services in ci-exec yet; remove services: from the job")
		assert.Empty(t, res.RunStages())
		assert.NotContains(t, res.Log, "ran-anyway-2")
	}, func(rt runtimeFixture) bool { return !rt.services })
}
