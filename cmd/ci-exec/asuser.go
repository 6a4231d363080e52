package main

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/ci-exec/ci-exec/internal/downscope"
	"github.com/ci-exec/ci-exec/internal/stages"
)

// asUser runs one stage as the job's user for a downscoping front (package
// downscope), which started this process with the job user's credentials
// and the handoff on fd 3. It is not a command for people: run by hand it
// finds no handoff and stops.
func asUser(ctx context.Context, stdout, stderr io.Writer) int {
	c, err := downscope.Accept(stages.DriverVersion())
	if err != nil {
		fmt.Fprintf(stderr, "ERROR: ci-exec %s: %v\n", downscope.AsUserCommand, err)
		return systemFailureCode()
	}
	h := &c.Handoff
	inv := stages.Invocation{ConfigPath: h.ConfigPath, Environ: os.Environ(), Stdout: stdout, Stderr: stderr, Child: c}
	var code int
	switch h.Stage {
	case downscope.StageConfig:
		code = stages.Config(ctx, inv)
	case downscope.StagePrepare:
		code = subreaper(stdout, func() int { return stages.Prepare(ctx, inv) })
	case downscope.StageRun:
		code = subreaper(stdout, func() int { return stages.Run(ctx, inv, "", h.ScriptStage) })
	case downscope.StageCleanup:
		code = subreaper(stderr, func() int { return stages.Cleanup(ctx, inv) })
	default:
		fmt.Fprintf(stderr, "ERROR: ci-exec %s: unknown stage %q\n", downscope.AsUserCommand, h.Stage)
		return systemFailureCode()
	}
	if err := c.Finish(); err != nil {
		fmt.Fprintf(stderr, "WARNING: ci-exec: report the %s stage's result to the privileged stage: %v\n", h.Stage, err)
	}
	return code
}
