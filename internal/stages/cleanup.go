package stages

import (
	"context"
	"os"
	"path/filepath"
	"syscall"
)

// runCleanup removes the job's scripts dir (copied scripts, batch output,
// credentials, per-job images) unless retain_logs is set. Builds and cache
// dirs stay: the runner reuses them for the next job.
func runCleanup(ctx context.Context, st *Stage) {
	if st.Cfg.IsBatch() {
		releaseAllocation(ctx, st, "cleanup")
		sweepGone(ctx, st)
	}
	releaseImages(ctx, st)
	if st.Cfg.General.RetainLogs {
		redactRetainedDir(st)
		st.Log.Printf("retain_logs: keeping %s", st.Layout.ScriptsDir)
		// The state dir holds nothing a person reads (per-job image copies
		// were just released): it always goes.
		removeJobDir(st, st.Layout.StateDir, st.Layout.DataDir, "state")
		return
	}
	removeJobDir(st, st.Layout.ScriptsDir, st.Layout.DataDir, "scripts")
	removeJobDir(st, st.Layout.StateDir, st.Layout.DataDir, "state")
}

// cleanupFromJobEnv cleans up with the layout handed over in job_env when
// the config cannot be read any more.
func cleanupFromJobEnv(st *Stage) {
	if st.Job == nil {
		return
	}
	data := st.Job.Host[envDataDir]
	if data == "" {
		return
	}
	if fi, err := os.Lstat(data); os.Geteuid() == 0 && (err != nil || fi.Sys().(*syscall.Stat_t).Uid != 0) {
		// A root process removes nothing in a user's tree (a downscoping
		// runner whose config cannot be read any more).
		st.Log.Warnf("cleanup: not removing job dirs under %s as root: it is not root's", data)
		return
	}
	for key, top := range map[string]string{envScriptsDir: "scripts", envStateDir: "state"} {
		if dir := st.Job.Host[key]; filepath.IsAbs(dir) {
			removeJobDir(st, filepath.Clean(dir), filepath.Clean(data), top)
		}
	}
}

// removeJobDir removes one job's dir under <data_dir>/<top>, never
// anything outside it.
func removeJobDir(st *Stage, dir, dataDir, top string) {
	scriptsRoot := filepath.Join(dataDir, top)
	if rel, err := filepath.Rel(scriptsRoot, dir); err != nil || rel == "." || rel == ".." || filepath.IsAbs(rel) || len(rel) > 2 && rel[:3] == "../" {
		st.Log.Warnf("cleanup: refusing to remove %s: not under %s", dir, scriptsRoot)
		return
	}
	if err := os.RemoveAll(dir); err != nil {
		st.Log.Warnf("cleanup: remove %s: %v", dir, err)
	}
	// Drop the now-empty slot and runner dirs; Remove fails harmlessly on a
	// dir another job still uses.
	for d := filepath.Dir(dir); d != scriptsRoot && len(d) > len(scriptsRoot); d = filepath.Dir(d) {
		if os.Remove(d) != nil {
			break
		}
	}
}
