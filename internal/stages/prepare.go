package stages

import (
	"context"
	"os"

	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/registry"
)

// runPrepare prints the job header and makes sure the job's directories
// exist; with a run mechanism it also resolves, checks and pulls the image.
func runPrepare(ctx context.Context, st *Stage) error {
	g := st.Cfg.General
	if st.Cfg.Mechanism() != nil && st.Job.Image() != "" {
		// The digest lookup needs the system's CA certificates, whose
		// parsing is most of a warm prepare: start it now, alongside the
		// checks that come first.
		registry.LoadTrust()
	}
	if g.JobMessage != "" {
		st.Log.Printf("%s", g.JobMessage)
	}
	host, _ := os.Hostname()
	st.Log.Noticef("ci-exec %s: running as %s (uid %d, gid %d) on %s, executor %s", DriverVersion(), st.User.Name,
		os.Getuid(), os.Getgid(), host, g.Executor)
	if err := st.Layout.Create(); err != nil {
		return failure.AsSystem(err)
	}
	defer holdJobLock(st)()
	// The site profile and limits are checked before anything else the
	// job asks for (site.go).
	js, err := siteFor(st.Cfg, st.Job.Vars)
	if err != nil {
		return err
	}
	for _, line := range js.Describe() {
		st.Log.Printf("%s", line)
	}
	js.warnHostLimits(st)
	alloc, err := prepareBatch(ctx, st)
	if err != nil {
		return err
	}
	// A failure from here on leaves the allocation in the state, and the
	// cleanup stage (which the runner always runs) ends it.
	if err := prepareMechanism(ctx, st); err != nil {
		return err
	}
	if alloc != nil {
		// The mechanism's prepare wrote the state afresh.
		if err := saveAllocation(st, alloc); err != nil {
			return failure.AsSystem(err)
		}
	}
	return nil
}
