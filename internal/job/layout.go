package job

import (
	"errors"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"

	"github.com/ci-exec/ci-exec/internal/owndir"
)

// Layout is where one job's files live under the admin's data_dir:
//
//	<data_dir>/builds/<runner>/<NNN>            builds_dir given to the runner
//	<data_dir>/cache/<runner>                   cache_dir given to the runner
//	<data_dir>/scripts/<runner>/<NNN>/<job-id>  per-job: copied stage scripts,
//	                                            batch output; bound into the
//	                                            job's containers; removed in
//	                                            cleanup
//	<data_dir>/state/<runner>/<NNN>/<job-id>    per-job, never bound into a
//	                                            container: what prepare
//	                                            decided, per-job image copies
//	                                            and mount points, the
//	                                            container's view skeleton;
//	                                            removed in cleanup
//
// <runner> is the runner's short token (so two runners sharing a data_dir never
// share a builds dir) and <NNN> the zero-padded CI_CONCURRENT_ID (so two jobs
// of one runner running at once never share one). The runner appends the
// project's full path to builds_dir itself.
type Layout struct {
	DataDir    string
	BuildsDir  string
	CacheDir   string
	ScriptsDir string
	// StateDir is the job's private dir that no container sees: the
	// state that steers later stages lives here, out of reach of the
	// job's own processes (see docs/security.md).
	StateDir string
}

// safeComponent reports whether v is a plain path component: 1 to 64 of
// [A-Za-z0-9_.-], starting with a letter or digit. (A regexp with {0,63}
// compiles to a large program at every start of ci-exec; this is the run
// path.)
func safeComponent(v string) bool {
	if v == "" || len(v) > 64 {
		return false
	}
	for i := 0; i < len(v); i++ {
		c := v[i]
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if !alnum && (i == 0 || c != '_' && c != '.' && c != '-') {
			return false
		}
	}
	return true
}

// NewLayout derives the layout for job j under dataDir. It is pure: every
// stage computes the same paths from the same job.
func NewLayout(dataDir string, j *Job) Layout {
	runner := "runner"
	for _, k := range []string{"CI_RUNNER_SHORT_TOKEN", "CI_RUNNER_ID"} {
		// These come from the runner but users can override them; anything
		// that is not a plain path component is ignored, never joined.
		if v := j.Vars[k]; safeComponent(v) && v != "." && v != ".." {
			runner = v
			break
		}
	}
	concurrent := 0
	if n, err := strconv.Atoi(j.Vars["CI_CONCURRENT_ID"]); err == nil && n >= 0 && n < 100000 {
		concurrent = n
	}
	slot := fmt.Sprintf("%03d", concurrent)
	dataDir = filepath.Clean(dataDir)
	return Layout{
		DataDir:    dataDir,
		BuildsDir:  filepath.Join(dataDir, "builds", runner, slot),
		CacheDir:   filepath.Join(dataDir, "cache", runner),
		ScriptsDir: filepath.Join(dataDir, "scripts", runner, slot, strconv.FormatInt(j.ID(), 10)),
		StateDir:   filepath.Join(dataDir, "state", runner, slot, strconv.FormatInt(j.ID(), 10)),
	}
}

// Create makes the layout's directories, 0700 and owned by the calling user.
// The top-level builds, cache and scripts dirs must belong to the job user:
// a data_dir shared between users (no $USER or $HOME in it) would otherwise
// let one user's job write into another's tree.
func (l Layout) Create() error {
	if err := os.MkdirAll(l.DataDir, 0o700); err != nil {
		return fmt.Errorf("create data_dir: %w", err)
	}
	for _, top := range []string{"builds", "cache", "scripts", "state"} {
		if err := ensurePrivateDir(filepath.Join(l.DataDir, top)); err != nil {
			return err
		}
	}
	for _, d := range []string{l.BuildsDir, l.CacheDir, l.ScriptsDir, l.StateDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return fmt.Errorf("create %s: %w", d, err)
		}
	}
	return nil
}

// ensurePrivateDir creates dir 0700 or checks that an existing one is a real
// directory owned by the caller, and tightens its mode.
func ensurePrivateDir(dir string) error {
	err := owndir.Private(dir)
	if errors.Is(err, owndir.ErrNotOwned) {
		return fmt.Errorf("%w; give every user their own data_dir, e.g. data_dir = \"/srv/ci/$USER\"", err)
	}
	return err
}

// CurrentUser returns the job user (the user ci-exec runs as) from the
// password database: the runner's environment may carry another HOME/USER.
func CurrentUser() (name, home string, err error) {
	u, err := user.Current()
	if err != nil {
		return "", "", fmt.Errorf("look up the job user (uid %d): %w", os.Getuid(), err)
	}
	return u.Username, u.HomeDir, nil
}
