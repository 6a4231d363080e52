package charliecloud

import (
	"context"
	"path/filepath"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/imagecache"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/mechanism/kit"
)

// convert builds the store entry key at out: a hard-linked copy of the
// stored image with the mount points made inside it, squashed with
// ch-convert. ch-run mounts the file itself (squashfuse is linked in), so a
// compute node needs nothing but the file. The image's shell and whether
// it has ENV settings are recorded with the entry.
func (r *Runtime) convert(ctx context.Context, info mechanism.Info, st *imagecache.Store, req mechanism.PullRequest, digest, key, out string) error {
	if tmp := r.convertTmp(); tmp != "" {
		if err := kit.EnsureUserDir(tmp); err != nil {
			return failure.Systemf("charliecloud: general.charliecloud.tmp_dir: %v", err)
		}
	}
	dir := out + ".d"
	defer removeTree(dir)
	if err := linkTree(filepath.Join(r.Storage, "img", forPath(req.Ref.FamiliarAtDigest(digest))), dir); err != nil {
		return failure.Systemf("charliecloud: copy image %s for conversion: %v", req.Ref.Full, err)
	}
	shell, runOptions, err := prepareTree(dir, req)
	if err != nil {
		return err
	}
	end := req.Log.Section("ch_convert", "ch-convert "+req.Ref.Full+" to SquashFS", false)
	w := req.Log.Writer()
	res, err := kit.RunTool(ctx, kit.Tool{Argv: r.convertArgv(info, dir, out), Env: r.toolEnv(auth.Credential{}, false), Dir: req.Dir, Output: w, Grace: r.Grace,
		Progress: &kit.Progress{What: "ch-convert", Dirs: []string{filepath.Dir(out)}, Logf: req.Log.Printf}})
	w.Close()
	end()
	if err != nil {
		return failure.Systemf("charliecloud: ch-convert %s: %v", req.Ref.Full, err)
	}
	if res.ExitCode != 0 {
		return failure.Systemf("charliecloud: ch-convert %s failed: %s", req.Ref.Full, kit.LastLine(res.Tail, "error:", "ch-convert"))
	}
	setenv := "no"
	if len(runOptions) > 0 {
		setenv = "yes"
	}
	if err := st.SetMeta(key, "shell", shell); err != nil {
		return failure.Systemf("charliecloud: %v", err)
	}
	if err := st.SetMeta(key, "setenv", setenv); err != nil {
		return failure.Systemf("charliecloud: %v", err)
	}
	return nil
}

// convertTmp is ch-convert's scratch dir: <tmp_dir>/<user>, or "" for
// ch-convert's default (/var/tmp).
func (r *Runtime) convertTmp() string {
	if r.Cfg.TmpDir == "" {
		return ""
	}
	return filepath.Join(r.Cfg.TmpDir, r.User.Name)
}

// convertArgv is the ch-convert command line (pure): an image directory to
// a SquashFS file.
func (r *Runtime) convertArgv(info mechanism.Info, dir, out string) []string {
	argv := []string{info.Program("ch-convert"), "-i", "dir", "-o", "squash"}
	if tmp := r.convertTmp(); tmp != "" {
		argv = append(argv, "--tmp", tmp)
	}
	return append(argv, dir, out)
}
