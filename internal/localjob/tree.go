package localjob

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// setUpProjectDir puts the project into the job's project dir: a copy of
// the tree or, with InPlace, a symlink to it. A project dir left by a
// local job that was killed goes first.
func (r *run) setUpProjectDir() error {
	for _, d := range []string{r.project, r.project + ".tmp"} {
		if err := os.RemoveAll(d); err != nil {
			return fmt.Errorf("remove the stale project dir %s: %w", d, err)
		}
	}
	if err := os.MkdirAll(filepath.Dir(r.project), 0o700); err != nil {
		return err
	}
	if r.opt.InPlace {
		r.logln("Running in the working tree %s (--in-place)", r.opt.Tree)
		return os.Symlink(r.opt.Tree, r.project)
	}
	files, err := TreeFiles(r.opt.Tree)
	if err != nil {
		return err
	}
	r.logln("Copying the working tree (%d files) to %s", len(files), r.project)
	if err := os.Mkdir(r.project, 0o755); err != nil {
		return err
	}
	return copyFiles(r.opt.Tree, r.project, files)
}

// TreeFiles lists the files of the working tree a job gets, relative to
// tree: in a git work tree the tracked and untracked files that are not
// ignored (git ls-files -co --exclude-standard, deleted ones left out),
// elsewhere every file. The .git dir is never copied.
func TreeFiles(tree string) ([]string, error) {
	if _, err := os.Stat(filepath.Join(tree, ".git")); err == nil {
		var out bytes.Buffer
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, "git", "-C", tree, "ls-files", "-z", "-co", "--exclude-standard")
		cmd.Stdout = &out
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Run(); err != nil {
			return nil, fmt.Errorf("git ls-files in %s: %v: %s", tree, err, strings.TrimSpace(stderr.String()))
		}
		var files []string
		for _, f := range strings.Split(out.String(), "\x00") {
			if f != "" {
				files = append(files, f)
			}
		}
		sort.Strings(files)
		return files, nil
	}
	var files []string
	err := filepath.WalkDir(tree, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(tree, p)
		if d.IsDir() {
			if d.Name() == ".git" {
				return filepath.SkipDir
			}
			return nil
		}
		files = append(files, rel)
		return nil
	})
	return files, err
}

// copyFiles copies files (relative paths) from src to dst: contents,
// modes and symlinks as links; a listed file that is gone (deleted but
// still tracked) is skipped, a listed directory (a submodule) copied
// whole.
func copyFiles(src, dst string, files []string) error {
	for _, f := range files {
		if err := copyPath(filepath.Join(src, f), filepath.Join(dst, f)); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			return fmt.Errorf("copy %s: %w", f, err)
		}
	}
	return nil
}

func copyPath(from, to string) error {
	fi, err := os.Lstat(from)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(to), 0o755); err != nil {
		return err
	}
	switch {
	case fi.Mode()&fs.ModeSymlink != 0:
		target, err := os.Readlink(from)
		if err != nil {
			return err
		}
		return os.Symlink(target, to)
	case fi.IsDir():
		return filepath.WalkDir(from, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			rel, _ := filepath.Rel(from, p)
			if d.IsDir() {
				if d.Name() == ".git" && rel != "." {
					return filepath.SkipDir
				}
				return os.MkdirAll(filepath.Join(to, rel), 0o755)
			}
			return copyPath(p, filepath.Join(to, rel))
		})
	case fi.Mode().IsRegular():
		return copyFile(from, to, fi.Mode().Perm())
	}
	return nil // sockets, fifos, devices: not part of a project
}

func copyFile(from, to string, mode fs.FileMode) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode|0o200)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// copyArtifacts copies the job's artifacts: paths (globs as GitLab takes
// them, relative to the project dir) from the project dir to
// ArtifactsDir, which is emptied first. With InPlace they are in the tree
// already.
func (r *run) copyArtifacts() (string, error) {
	if r.opt.InPlace {
		r.logln("Artifacts are in the working tree (--in-place)")
		return r.opt.Tree, nil
	}
	dst := r.opt.ArtifactsDir
	if dst == "" {
		return "", errors.New("no artifacts directory")
	}
	if err := os.RemoveAll(dst); err != nil {
		return "", err
	}
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return "", err
	}
	n := 0
	for _, pat := range r.job.ArtifactPaths {
		clean := filepath.Clean(strings.TrimPrefix(pat, "./"))
		if filepath.IsAbs(clean) || clean == ".." || strings.HasPrefix(clean, "../") {
			r.logln("WARNING: artifacts: %s is outside the project dir; skipped", pat)
			continue
		}
		matches, err := globArtifacts(r.project, clean)
		if err != nil {
			return dst, err
		}
		if len(matches) == 0 {
			r.logln("WARNING: %s: no matching files", pat)
			continue
		}
		for _, m := range matches {
			if err := copyPath(filepath.Join(r.project, m), filepath.Join(dst, m)); err != nil && !errors.Is(err, fs.ErrExist) {
				return dst, fmt.Errorf("copy %s: %w", m, err)
			}
			n++
		}
	}
	r.logln("%d artifact path(s) copied to %s", n, dst)
	return dst, nil
}

// globArtifacts matches pat under root: filepath.Match per component, **
// for any number of directories.
func globArtifacts(root, pat string) ([]string, error) {
	if !strings.ContainsAny(pat, "*?[") {
		if _, err := os.Lstat(filepath.Join(root, pat)); err != nil {
			return nil, nil
		}
		return []string{pat}, nil
	}
	var out []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		rel, _ := filepath.Rel(root, p)
		if rel == "." {
			return nil
		}
		if matchGlob(strings.Split(pat, "/"), strings.Split(filepath.ToSlash(rel), "/")) {
			out = append(out, rel)
			if d.IsDir() {
				return filepath.SkipDir
			}
		}
		return nil
	})
	return out, err
}

func matchGlob(pat, name []string) bool {
	if len(pat) == 0 {
		return len(name) == 0
	}
	if pat[0] == "**" {
		for i := 0; i <= len(name); i++ {
			if matchGlob(pat[1:], name[i:]) {
				return true
			}
		}
		return false
	}
	if len(name) == 0 {
		return false
	}
	ok, err := filepath.Match(pat[0], name[0])
	return err == nil && ok && matchGlob(pat[1:], name[1:])
}

// Git reads the tree's commit and ref (zero values outside a git repo or
// before the first commit).
func Git(tree string) GitInfo {
	run := func(args ...string) string {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, "git", append([]string{"-C", tree}, args...)...).Output()
		if err != nil {
			return ""
		}
		return strings.TrimSpace(string(out))
	}
	var g GitInfo
	g.Sha = run("rev-parse", "--verify", "-q", "HEAD")
	if g.Sha == "" {
		return GitInfo{}
	}
	if b := run("symbolic-ref", "-q", "--short", "HEAD"); b != "" {
		g.Ref, g.Branch = b, true
	} else {
		g.Ref = g.Sha
	}
	return g
}
