package stages

import (
	"context"
	"os"
	"path/filepath"
)

// runCleanup removes the job's scripts dir (copied scripts, batch output,
// credentials, per-job images) unless retain_logs is set. Builds and cache
// dirs stay: the runner reuses them for the next job.
func runCleanup(ctx context.Context, st *Stage) {
	releaseImages(ctx, st)
	if st.Cfg.General.RetainLogs {
		redactRetainedDir(st)
		st.Log.Printf("retain_logs: keeping %s", st.Layout.ScriptsDir)
		return
	}
	removeScriptsDir(st, st.Layout.ScriptsDir, st.Layout.DataDir)
}

// cleanupFromJobEnv cleans up with the layout handed over in job_env when
// the config cannot be read any more.
func cleanupFromJobEnv(st *Stage) {
	if st.Job == nil {
		return
	}
	dir, data := st.Job.Host[envScriptsDir], st.Job.Host[envDataDir]
	if dir == "" || data == "" || !filepath.IsAbs(dir) {
		return
	}
	removeScriptsDir(st, filepath.Clean(dir), filepath.Clean(data))
}

func removeScriptsDir(st *Stage, dir, dataDir string) {
	scriptsRoot := filepath.Join(dataDir, "scripts")
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
