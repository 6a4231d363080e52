package stages

import (
	"context"

	"github.com/ci-exec/ci-exec/internal/downscope"
)

// downscopes reports whether this call is the privileged front of a
// downscoping runner (auth.downscope = "setuid"), which runs the stage as
// the job's user instead of itself.
func (st *Stage) downscopes() bool { return st.Cfg.Auth.Downscoping() && st.Inv.Child == nil }

// delegate runs the stage as the job's user (package downscope) and turns
// its outcome into this call's exit code.
func (st *Stage) delegate(ctx context.Context, stage, scriptPath, scriptStage string) int {
	out, err := downscope.Run(ctx, downscope.Call{
		Stage: stage, ScriptPath: scriptPath, ScriptStage: scriptStage,
		Cfg: st.Cfg, Doc: st.doc, ConfigPath: st.Cfg.Path,
		Job: st.Job, Environ: st.Inv.Environ, Stdout: st.Inv.Stdout, Stderr: st.Inv.Stderr,
		Log: st.Log, Version: DriverVersion(),
	})
	if err != nil {
		return exit(st, err)
	}
	if out.ScriptCode != nil {
		writeExitCode(st, *out.ScriptCode)
	}
	return out.Exit
}
