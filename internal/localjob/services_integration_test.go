package localjob_test

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/runnerdouble"
	"github.com/ci-exec/ci-exec/internal/testenv"
)

// TestExecWithService: `ci-exec exec` runs a job's services: as the runner
// would (the busybox image's httpd, alias web), keeps them alive from
// prepare to cleanup (it is a subreaper that ends every stage's
// leftovers, but not the services the driver names) and stops them.
func TestExecWithService(t *testing.T) {
	for _, rt := range []struct{ name, program, table string }{
		{"charliecloud", "ch-run", ""},
		{"apptainer", "apptainer", `application_path = "/opt/apptainer/bin"`},
	} {
		t.Run(rt.name, func(t *testing.T) {
			testenv.RequireBinary(t, rt.program)
			u := testenv.Unprivileged(t)
			image := testenv.Fact(t, "CI_EXEC_TEST_IMAGE_ANON")
			storage := filepath.Join(testenv.PrivateDir(t, u), "images")
			require.NoError(t, os.Mkdir(storage, 0o755))
			require.NoError(t, os.Chown(storage, u.UID, u.GID))
			cfg := fmt.Sprintf("run_mechanism = %q\n[general.%s]\nimage_storage_dir = %q\n%s\n", rt.name, rt.name, storage, rt.table)
			p := newProject(t, u, "image: "+image, cfg)
			l, err := net.Listen("tcp", "127.0.0.1:0")
			require.NoError(t, err)
			port := l.Addr().(*net.TCPAddr).Port
			l.Close()
			y := fmt.Sprintf(`svc:
  image: %[1]s
  services:
    - name: %[1]s
      alias: web
      command: ["httpd", "-f", "-p", "%[2]d", "-h", "/etc"]
      variables:
        HEALTHCHECK_TCP_PORT: "%[2]d"
        MARKER: %[3]s
  script:
    - wget -q -O - http://web:%[2]d/os-release
`, image, port, p.marker)
			require.NoError(t, os.WriteFile(filepath.Join(p.tree, ".gitlab-ci.yml"), []byte(y), 0o644))
			require.NoError(t, os.Chown(filepath.Join(p.tree, ".gitlab-ci.yml"), u.UID, u.GID))
			out, _, code := p.execJob(t, "svc")
			assert.Equal(t, 0, code)
			assert.Contains(t, out, fmt.Sprintf("Service web (%s) is listening on port %d", image, port))
			assert.True(t, strings.Contains(out, "\nID=citiny\n"), "the job reached the service")
			assert.Empty(t, runnerdouble.ProcessesWithMarker(p.marker), "the service was stopped")
		})
	}
}
