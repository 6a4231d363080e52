package stages

import (
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/mechanism/host"
)

// hostPlan runs script on the host, through the host Runtime: bash with
// the job's host environment, in the builds dir.
func hostPlan(st *Stage, script string) (Plan, error) {
	rt := host.New(st.Cfg.General.ShellPath, st.Cfg.General.LoginShell)
	env := scriptEnv(st)
	if js, err := siteFor(st.Cfg, st.Job.Vars); err != nil {
		return Plan{}, err
	} else {
		// A profile's env reaches host jobs too; its binds cannot.
		env = js.profileEnv(env)
	}
	argv, env, err := rt.Command(mechanism.RunSpec{Argv: []string{script}, Env: env})
	if err != nil {
		return Plan{}, err
	}
	return Plan{Where: "host", Argv: argv, Env: env, Dir: st.Layout.BuildsDir, Runtime: rt}, nil
}
