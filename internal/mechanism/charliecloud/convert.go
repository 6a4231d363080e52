package charliecloud

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/mechanism"
)

// Convert turns the job's copy into a SquashFS file in req.Dir, with the
// mount points already inside it, and drops the copy. ch-run mounts the
// file itself (squashfuse is linked in) at a per-job mount point next to
// it, so a compute node needs nothing but the file.
func (r *Runtime) Convert(ctx context.Context, img mechanism.Image, req mechanism.ConvertRequest) (mechanism.Image, error) {
	if img.Format != FormatStorage {
		return img, nil
	}
	info, err := r.Probe(ctx)
	if err != nil {
		return img, err
	}
	if _, ok := info.Programs["ch-convert"]; !ok {
		return img, failure.Systemf("charliecloud: ch-convert not found in %s, but this job's image must be converted (batch executor or convert = true); install it or set disable_convert", strings.Join(mechanism.ProgramDirs(r.Cfg.ApplicationPath), ":"))
	}
	key := strings.TrimPrefix(img.Handle, jobImageRepo+":")
	out := filepath.Join(req.Dir, key+".sqfs")
	mnt := filepath.Join(req.Dir, key+".mnt")
	if tmp := r.convertTmp(); tmp != "" {
		if err := mechanism.EnsureUserDir(tmp); err != nil {
			return img, failure.Systemf("charliecloud: general.charliecloud.tmp_dir: %v", err)
		}
	}
	argv := r.convertArgv(info, img.Handle, out)
	end := req.Log.Section("ch_convert", "ch-convert "+img.Ref+" to SquashFS", false)
	w := req.Log.Writer()
	start := time.Now()
	res, err := r.runBusy(ctx, mechanism.Tool{Argv: argv, Env: r.toolEnv(auth.Credential{}, false), Dir: req.Dir, Output: w, Grace: r.Grace},
		mechanism.PullRequest{Log: req.Log})
	w.Close()
	end()
	if err != nil {
		return img, failure.Systemf("charliecloud: ch-convert %s: %v", img.Ref, err)
	}
	if res.ExitCode != 0 {
		_ = os.Remove(out)
		return img, failure.Systemf("charliecloud: ch-convert %s failed: %s", img.Ref, mechanism.LastLine(res.Tail, "error:", "ch-convert"))
	}
	if err := os.Mkdir(mnt, 0o700); err != nil && !os.IsExist(err) {
		return img, failure.Systemf("charliecloud: create the SquashFS mount point %s: %v", mnt, err)
	}
	// The storage copy is no longer needed; the file has everything.
	if err := r.Release(ctx, mechanism.Image{Private: img.Private}, req.Dir); err != nil {
		req.Log.Warnf("could not remove the job's image copy: %v", err)
	}
	conv := img
	conv.Format = FormatSquash
	conv.Handle = out
	conv.Private = []string{out, mnt}
	conv.RunOptions = append([]string{"--mount=" + mnt}, img.RunOptions...)
	conv.ConvertTime = time.Since(start)
	return conv, nil
}

// convertTmp is ch-convert's scratch dir: <tmp_dir>/<user>, or "" for
// ch-convert's default (/var/tmp).
func (r *Runtime) convertTmp() string {
	if r.Cfg.TmpDir == "" {
		return ""
	}
	return filepath.Join(r.Cfg.TmpDir, r.User.Name)
}

// convertArgv is the ch-convert command line (pure). ch-convert has no -s:
// the storage comes from CH_IMAGE_STORAGE in toolEnv.
func (r *Runtime) convertArgv(info mechanism.Info, name, out string) []string {
	argv := []string{info.Program("ch-convert"), "-i", "ch-image", "-o", "squash"}
	if tmp := r.convertTmp(); tmp != "" {
		argv = append(argv, "--tmp", tmp)
	}
	return append(argv, name, out)
}
