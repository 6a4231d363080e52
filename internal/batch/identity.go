package batch

import (
	"strconv"
	"strings"
)

// Identity is the CI job a Slurm job belongs to. It travels in the Slurm
// job's comment (squeue %k, `scontrol show job`), so that cleanup and
// `ci-exec sweep` can find the jobs of a CI job whose runner or driver died
// and tell their own jobs from everyone else's.
type Identity struct {
	// JobID is the GitLab job id.
	JobID int64
	// Pipeline is the pipeline id and Project the project's full path
	// (for people reading squeue).
	Pipeline string
	Project  string
	// Runner is the runner's short token.
	Runner string
	// StateDir is the CI job's state dir: the sweep looks there whether
	// the CI job still has a live ci-exec stage (see docs/slurm.md).
	StateDir string
}

// commentTag starts every comment ci-exec writes.
const commentTag = "ci-exec"

// Comment renders the identity as "ci-exec job=N pipeline=P project=G/P
// runner=T state=/DIR". The state dir comes last and may contain spaces;
// the other values are reduced to characters that need no quoting.
func (i Identity) Comment() string {
	return commentTag + " job=" + strconv.FormatInt(i.JobID, 10) +
		" pipeline=" + safeWord(i.Pipeline) + " project=" + safeWord(i.Project) +
		" runner=" + safeWord(i.Runner) + " state=" + i.StateDir
}

// ParseComment reads a comment written by Comment; ok is false for any
// other comment (not ci-exec's, or from a user's --comment).
func ParseComment(c string) (Identity, bool) {
	rest, ok := strings.CutPrefix(strings.TrimSpace(c), commentTag+" job=")
	if !ok {
		return Identity{}, false
	}
	head, state, ok := strings.Cut(rest, " state=")
	if !ok || !strings.HasPrefix(state, "/") {
		return Identity{}, false
	}
	f := strings.Fields(head)
	if len(f) != 4 {
		return Identity{}, false
	}
	id, err := strconv.ParseInt(f[0], 10, 64)
	if err != nil {
		return Identity{}, false
	}
	i := Identity{JobID: id, StateDir: state}
	for _, kv := range f[1:] {
		k, v, _ := strings.Cut(kv, "=")
		switch k {
		case "pipeline":
			i.Pipeline = v
		case "project":
			i.Project = v
		case "runner":
			i.Runner = v
		default:
			return Identity{}, false
		}
	}
	return i, true
}

// safeWord keeps [A-Za-z0-9_./-] and replaces anything else (spaces, '=',
// control characters) with '_'; "" becomes "-".
func safeWord(s string) string {
	if s == "" {
		return "-"
	}
	var b strings.Builder
	for _, r := range s {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '.' || r == '/' || r == '-' {
			b.WriteRune(r)
		} else {
			b.WriteByte('_')
		}
	}
	return b.String()
}
