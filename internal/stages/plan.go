package stages

import (
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/mechanism/host"
)

// hostPlan runs script on the host, through the host Runtime: bash with
// the job's host environment, in the builds dir.
func hostPlan(st *Stage, script string) (Plan, error) {
	rt := host.New(st.Cfg.General.ShellPath, st.Cfg.General.LoginShell)
	argv, env, err := rt.Command(mechanism.RunSpec{Argv: []string{script}, Env: scriptEnv(st)})
	if err != nil {
		return Plan{}, err
	}
	return Plan{Where: "host", Argv: argv, Env: env, Dir: st.Layout.BuildsDir, Runtime: rt}, nil
}
