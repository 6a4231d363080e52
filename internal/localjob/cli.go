package localjob

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/gitlabci"
	"github.com/ci-exec/ci-exec/internal/job"
)

// Usage is `ci-exec help exec`.
const Usage = `usage: ci-exec [--config PATH] exec [flags] [JOB]

Runs one job of the project's .gitlab-ci.yml on this machine, through the
same stages and the same admin configuration as a CI job of the runner
(image allowlist, placement, volumes, user args, Slurm when configured),
prints its job log and exits with the job's exit code.

The job runs in a copy of the working tree (tracked and untracked files,
not ignored ones) in the job's builds dir; the tree itself is not touched.
The job's artifacts: paths are copied to --artifacts-dir afterwards.
Nothing is left behind: no process, no job dir.

Flags:
  --list               list the jobs of the file with their stage and image
  --file PATH          the pipeline file, relative to the tree (default .gitlab-ci.yml)
  --dir DIR            the project's working tree (default: the git work tree
                       of the current directory, or the current directory)
  --var K=V            set a job variable (repeatable; wins over the file's)
  --env-file PATH      read job variables from PATH: KEY=VALUE lines, # comments
  --in-place           run in the working tree itself (the job can change it);
                       a job in an image needs the admin's user_volume_variable
                       and volume_prefixes to cover the tree
  --artifacts-dir DIR  where artifacts: paths go (default
                       $XDG_CACHE_HOME/ci-exec/artifacts/<project>/<job>)
  --project PATH       CI_PROJECT_PATH (default local/<tree name>)

Exit status: the job script's exit code; 0 when the job succeeded; 1 for a
job refused before its script ran (an image outside the allowlist, ...);
2 for a system failure or a usage error.

Examples:
  ci-exec exec --list
  ci-exec exec build
  ci-exec exec --var DEBUG=1 --env-file ~/ci.env test
  ci-exec --config ~/ci-exec.toml exec --in-place lint
`

// Main is `ci-exec exec`: driver is the ci-exec binary, configPath the
// admin config.
func Main(ctx context.Context, args []string, driver, configPath string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("ci-exec exec", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, Usage) }
	list := fs.Bool("list", false, "")
	file := fs.String("file", gitlabci.DefaultFile, "")
	dir := fs.String("dir", "", "")
	inPlace := fs.Bool("in-place", false, "")
	artifacts := fs.String("artifacts-dir", "", "")
	project := fs.String("project", "", "")
	var vars []gitlabci.Variable
	fs.Func("var", "", func(s string) error {
		v, err := parseVar(s)
		if err != nil {
			return err
		}
		vars = append(vars, v)
		return nil
	})
	fs.Func("env-file", "", func(p string) error {
		vs, err := readEnvFile(p)
		if err != nil {
			return err
		}
		vars = append(vars, vs...)
		return nil
	})
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return systemFailureCode
	}
	fail := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "ERROR: ci-exec exec: "+format+"\n", a...)
		return systemFailureCode
	}

	tree, err := findTree(*dir)
	if err != nil {
		return fail("%v", err)
	}
	pipeline, err := gitlabci.Load(tree, *file)
	if err != nil {
		return fail("%v", err)
	}
	for _, n := range pipeline.Notes {
		fmt.Fprintf(stderr, "WARNING: %s\n", n)
	}
	if *list {
		return listJobs(pipeline, stdout, stderr)
	}
	if fs.NArg() != 1 {
		names := pipeline.JobNames()
		return fail("name one job to run (ci-exec exec JOB); the file has: %s", strings.Join(names, ", "))
	}
	j, err := pipeline.Job(fs.Arg(0))
	if err != nil {
		return fail("%v", err)
	}
	if missing := missingMatrixVars(j, vars); len(missing) > 0 {
		return fail("%s is a parallel:matrix job: pick one combination with --var for %s", j.Name, strings.Join(missing, ", "))
	}

	// The admin config is read here too, to fail early with the config's
	// own message and to know how long a stopped stage may take.
	name, home, err := job.CurrentUser()
	if err != nil {
		return fail("%v", err)
	}
	cfg, err := config.Load(configPath, config.UserInfo{Name: name, Home: home})
	if err != nil {
		return fail("%v (ci-exec check --config %s lists every problem)", err, configPath)
	}
	if *project == "" {
		*project = "local/" + slugOrLocal(filepath.Base(tree))
	}
	if *artifacts == "" {
		*artifacts = defaultArtifactsDir(*project, j.Name)
	}
	opt := Options{
		Driver: driver, ConfigPath: configPath, Tree: tree, ProjectPath: *project,
		Git: Git(tree), InPlace: *inPlace, ArtifactsDir: *artifacts, Vars: vars,
		BaseEnv: baseEnv(), Log: stdout, Diag: stderr,
		Grace: cfg.General.KillTimeout.Duration + 15*time.Second,
	}
	if *inPlace && j.Image.Name != "" || *inPlace && cfg.General.ForceMechanism {
		v := volumeVariable(cfg)
		if v == "" {
			return fail("--in-place with a job in a container binds the tree through the admin's user_volume_variable, which this config does not set; run without --in-place")
		}
		opt.Vars = append(opt.Vars, gitlabci.Variable{Key: nextVolume(v, append(append([]gitlabci.Variable(nil), vars...), j.Variables...)), Value: tree})
	}
	res, err := Run(ctx, j, opt)
	if err != nil {
		return fail("%v", err)
	}
	if res.Artifacts != "" && !*inPlace {
		fmt.Fprintf(stderr, "ci-exec exec: artifacts of %s are in %s\n", j.Name, res.Artifacts)
	}
	return res.ExitCode
}

func listJobs(p *gitlabci.Config, stdout, stderr io.Writer) int {
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "JOB\tSTAGE\tIMAGE")
	code := 0
	for _, n := range p.JobNames() {
		j, err := p.Job(n)
		if err != nil {
			fmt.Fprintf(stderr, "ERROR: %v\n", err)
			code = systemFailureCode
			continue
		}
		img := j.Image.Name
		if img == "" {
			img = "(host)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", n, j.Stage, img)
	}
	tw.Flush()
	return code
}

func parseVar(s string) (gitlabci.Variable, error) {
	k, v, ok := strings.Cut(s, "=")
	if !ok || !validName(k) {
		return gitlabci.Variable{}, fmt.Errorf("--var %q: write NAME=VALUE (NAME of letters, digits and _)", s)
	}
	return gitlabci.Variable{Key: k, Value: v}, nil
}

func validName(k string) bool {
	if k == "" {
		return false
	}
	for i, c := range k {
		if c != '_' && !(c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z') && !(i > 0 && c >= '0' && c <= '9') {
			return false
		}
	}
	return true
}

// readEnvFile reads KEY=VALUE lines (docker's --env-file format: the value
// is taken as written, no quotes removed; "export " before KEY allowed;
// blank lines and # comments skipped).
func readEnvFile(p string) ([]gitlabci.Variable, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, fmt.Errorf("--env-file: %w", err)
	}
	defer f.Close()
	var out []gitlabci.Variable
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	n := 0
	for sc.Scan() {
		n++
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		line = strings.TrimPrefix(line, "export ")
		v, err := parseVar(line)
		if err != nil {
			return nil, fmt.Errorf("--env-file %s:%d: write NAME=VALUE", p, n)
		}
		out = append(out, v)
	}
	return out, sc.Err()
}

// findTree is --dir, or the git work tree of the current directory, or
// the current directory.
func findTree(dir string) (string, error) {
	if dir == "" {
		wd, err := os.Getwd()
		if err != nil {
			return "", err
		}
		dir = wd
		if out, err := exec.Command("git", "-C", wd, "rev-parse", "--show-toplevel").Output(); err == nil {
			if top := strings.TrimSpace(string(out)); top != "" {
				dir = top
			}
		}
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	abs, err = filepath.EvalSymlinks(abs)
	if err != nil {
		return "", fmt.Errorf("--dir %s: %w", dir, err)
	}
	return abs, nil
}

func missingMatrixVars(j *gitlabci.Job, vars []gitlabci.Variable) []string {
	var missing []string
	for _, m := range j.MatrixVars {
		found := false
		for _, v := range vars {
			found = found || v.Key == m
		}
		if !found {
			missing = append(missing, m)
		}
	}
	return missing
}

func slugOrLocal(s string) string {
	if v := slug(s); v != "" {
		return v
	}
	return "project"
}

func defaultArtifactsDir(project, jobName string) string {
	base := os.Getenv("XDG_CACHE_HOME")
	if base == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			home = os.TempDir()
		}
		base = filepath.Join(home, ".cache")
	}
	return filepath.Join(base, "ci-exec", "artifacts", filepath.FromSlash(project), slugOrLocal(jobName))
}

// baseEnv is the runner's own environment: the user's, without what the
// runner itself would set for a driver call.
func baseEnv() []string {
	var out []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch {
		case strings.HasPrefix(k, job.CustomEnvPrefix), strings.HasPrefix(k, "CI_EXEC_"):
		case k == "JOB_RESPONSE_FILE", k == "BUILD_EXIT_CODE_FILE", k == "BUILD_FAILURE_EXIT_CODE",
			k == "SYSTEM_FAILURE_EXIT_CODE", k == "TMPDIR":
		default:
			out = append(out, kv)
		}
	}
	return out
}

func volumeVariable(cfg *config.Config) string {
	if m := cfg.Mechanism(); m != nil {
		return m.UserVolumeVariable
	}
	return ""
}

// nextVolume is the first <prefix>_<n> the user's variables leave free.
func nextVolume(prefix string, vars []gitlabci.Variable) string {
	for n := 0; ; n++ {
		k := prefix + "_" + strconv.Itoa(n)
		used := false
		for _, v := range vars {
			used = used || v.Key == k
		}
		if !used {
			return k
		}
	}
}
