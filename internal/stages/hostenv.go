package stages

import (
	"os"
	"sort"
	"strings"

	"github.com/ci-exec/ci-exec/internal/config"
)

// systemPath is where programs are looked up when the admin gives no path:
// a fixed list, because the runner's own PATH may put a language version
// manager's python or bash first (see docs/admin-guide.md).
const systemPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// scriptEnv is the environment a job script starts with on the host: the
// runner-environment variables the admin lets through (pass_env), the job
// user's identity from the password database, and the admin's env_vars. The
// job's own variables are not here: the runner exports them inside the
// script itself.
func scriptEnv(st *Stage) []string {
	env := map[string]string{}
	for k, v := range st.Job.Host {
		if config.MatchAny(st.Cfg.General.PassEnv, k) {
			env[k] = v
		}
	}
	if _, ok := env["PATH"]; !ok {
		env["PATH"] = systemPath
	}
	env["HOME"] = st.User.Home
	env["USER"] = st.User.Name
	env["LOGNAME"] = st.User.Name
	for _, kv := range st.Cfg.General.EnvVars {
		k, v, _ := strings.Cut(kv, "=")
		env[k] = os.Expand(v, func(name string) string {
			if cur, ok := env[name]; ok {
				return cur
			}
			return st.Job.Host[name]
		})
	}
	return envList(env)
}

// envList renders a map as a sorted KEY=VALUE list (sorted so command lines
// and tests are deterministic).
func envList(env map[string]string) []string {
	out := make([]string, 0, len(env))
	for k, v := range env {
		out = append(out, k+"="+v)
	}
	sort.Strings(out)
	return out
}
