package stages

import (
	"context"
	"encoding/json"
	"fmt"
	"os"

	"gitlab.com/gitlab-org/gitlab-runner/executors/custom/api"

	"github.com/ci-exec/ci-exec/internal/failure"
)

// runConfig answers config_exec: only JSON on stdout, diagnostics on stderr.
// It also creates the job's directories, so that a data_dir problem fails
// the job here, where the runner retries, rather than in a later stage.
func runConfig(_ context.Context, st *Stage) error {
	if err := st.Layout.Create(); err != nil {
		return failure.AsSystem(err)
	}
	host, err := os.Hostname()
	if err != nil {
		host = "unknown"
	}
	name, version := DriverName, DriverVersion()
	notShared := false
	env := layoutJobEnv(st.Layout)
	out := api.ConfigExecOutput{
		Driver:            &api.DriverInfo{Name: &name, Version: &version},
		Hostname:          &host,
		BuildsDir:         &st.Layout.BuildsDir,
		CacheDir:          &st.Layout.CacheDir,
		BuildsDirIsShared: &notShared,
		JobEnv:            &env,
	}
	b, err := json.Marshal(out)
	if err != nil {
		return failure.AsSystem(fmt.Errorf("encode config answer: %w", err))
	}
	if _, err := st.Inv.Stdout.Write(append(b, '\n')); err != nil {
		return failure.AsSystem(fmt.Errorf("write config answer: %w", err))
	}
	return nil
}
