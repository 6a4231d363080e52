package stages

// hostPlan runs script with bash on the host.
func hostPlan(st *Stage, script string) Plan {
	shell := st.Cfg.General.ShellPath
	if shell == "" {
		shell = "/bin/bash"
	}
	argv := []string{shell, "--noprofile", "--norc", script}
	if st.Cfg.General.LoginShell {
		argv = []string{shell, "--login", script}
	}
	return Plan{Where: "host", Argv: argv, Env: scriptEnv(st), Dir: st.Layout.BuildsDir}
}
