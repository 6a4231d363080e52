package apptainer

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/imagecache"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/mechanism/kit"
	"github.com/ci-exec/ci-exec/internal/registry"
)

// FormatSIF is the only image format: a SIF file.
const FormatSIF = "sif"

// Pull makes the image available as a SIF in the user's store, keyed by
// its manifest digest (sha256-HEX.sif): the digest is resolved by the pull
// policy (kit.ResolveDigest), exactly that digest is pulled unless
// the store has it, concurrent jobs pull it once (imagecache.Store.Ensure),
// and the job takes a lease on the entry, so eviction leaves it alone until
// cleanup. A SIF is already a single file, so req.SingleFile needs nothing
// more.
func (r *Runtime) Pull(ctx context.Context, req mechanism.PullRequest) (mechanism.Image, error) {
	start := time.Now()
	ctx = kit.StoreTrace(ctx, req.Log)
	img := mechanism.Image{Ref: req.Ref.Full, Format: FormatSIF}
	info, err := r.Probe(ctx)
	if err != nil {
		return img, err
	}
	if err := r.prepareDirs(); err != nil {
		return img, failure.Systemf("apptainer: %v", err)
	}
	st, err := r.Store()
	if err != nil {
		return img, failure.Systemf("apptainer: %v", err)
	}
	key := func(digest string) string { return strings.ReplaceAll(digest, ":", "-") + ".sif" }
	img.Digest, err = kit.ResolveDigest(ctx, st, req, credentialVariables, registry.Options{PlainHTTP: req.Insecure},
		func(d string) bool { return imagecache.ValidSIF(st.Path(key(d))) == nil })
	if err != nil {
		return img, err
	}
	k := key(img.Digest)
	res, err := st.Ensure(ctx, k, req.JobKey, imagecache.ValidSIF, func(ctx context.Context, tmp string) error {
		t := time.Now()
		defer func() { img.PullTime = time.Since(t) }()
		return r.pull(ctx, info, req, req.Ref.AtDigest(img.Digest), tmp)
	})
	if err != nil {
		return img, kit.StoreError(err)
	}
	kit.LogDamaged(req.Log, res)
	img.Cache = kit.CacheState(res)
	if err := st.SetTag(req.Ref.Full, img.Digest); err != nil {
		req.Log.Warnf("could not record the digest of %s: %v", req.Ref.Full, err)
	}
	img.Handle, img.Lease = res.Path, res.Lease
	if img.Shell = st.Meta(k, "shell"); img.Shell == "" {
		if img.Shell, err = r.findShell(ctx, info, img.Handle, req); err != nil {
			_ = r.Release(ctx, img, req.Dir)
			return img, err
		}
		_ = st.SetMeta(k, "shell", img.Shell)
	}
	img.ReadyTime = time.Since(start)
	return img, nil
}

// prepareDirs makes the user's storage, cache and tmp dirs, checking those
// in admin-chosen (possibly shared) parents.
func (r *Runtime) prepareDirs() error {
	if err := kit.EnsureUserDir(r.Storage); err != nil {
		return fmt.Errorf("image storage: %w", err)
	}
	for _, d := range []struct{ key, root, dir string }{{"cache_dir", r.Cfg.CacheDir, r.cacheDir()}, {"tmp_dir", r.Cfg.TmpDir, r.tmpDir()}} {
		var err error
		if d.root == "" {
			err = os.MkdirAll(d.dir, 0o700)
		} else {
			err = kit.EnsureUserDir(d.dir)
		}
		if err != nil {
			return fmt.Errorf("general.apptainer.%s: %w", d.key, err)
		}
	}
	return nil
}

// pull runs apptainer pull of source (the reference at its digest) into
// out, a temporary name in the store that Ensure publishes.
func (r *Runtime) pull(ctx context.Context, info mechanism.Info, req mechanism.PullRequest, source, out string) error {
	end := req.Log.Section("apptainer_pull", "apptainer pull "+source, false)
	w := req.Log.Writer()
	// Apptainer fetches the blobs into its cache dir, builds in its tmp
	// dir and writes the SIF next to out.
	res, err := kit.RunTool(ctx, kit.Tool{Argv: r.pullArgv(info, req, source, out), Env: r.toolEnv(req.Credential), Dir: req.Dir, Output: w, Grace: r.Grace,
		Progress: &kit.Progress{What: "apptainer pull", Dirs: []string{r.cacheDir(), r.tmpDir(), filepath.Dir(out)}, Logf: req.Log.Printf}})
	w.Close()
	end()
	if err != nil {
		return failure.Systemf("apptainer: apptainer pull %s: %v", req.Ref.Full, err)
	}
	if res.ExitCode != 0 {
		return classifyPull(req.Ref.Full, req.Credential, res.Tail, r.Storage)
	}
	return nil
}

// pullArgv is the apptainer pull command line (pure). No credential is ever
// part of it: they travel in the environment (toolEnv).
func (r *Runtime) pullArgv(info mechanism.Info, req mechanism.PullRequest, source, out string) []string {
	argv := []string{info.Program("apptainer"), "pull", "--force"}
	if req.Insecure {
		argv = append(argv, "--no-https")
	}
	return append(argv, out, "docker://"+source)
}

// classifyPull reads a failed apptainer pull's output; the class and the
// advice are the shared ones (kit.PullError).
func classifyPull(ref string, cred auth.Credential, tail, storage string) error {
	last := kit.LastLine(tail, "FATAL:", "ERROR:")
	if last == "" {
		last = kit.LastLine(tail)
	}
	// The FATAL line decides: INFO and WARNING lines before it may contain
	// the same words harmlessly ("gocryptfs not found").
	kind, last := kit.GoPullFailure("apptainer", last, tail)
	return kit.PullError(kind, ref, cred, credentialVariables, storage, last)
}

// findShell picks the image's shell for stage scripts: bash when it has
// one, else sh (the runner's scripts work in both). Apptainer cannot look
// into a SIF without running it, so this runs the image's sh once.
func (r *Runtime) findShell(ctx context.Context, info mechanism.Info, sif string, req mechanism.PullRequest) (string, error) {
	var out strings.Builder
	argv := []string{info.Program("apptainer"), "exec", "--cleanenv", sif, "/bin/sh", "-c", kit.ShellProbe}
	res, err := kit.RunTool(ctx, kit.Tool{Argv: argv, Env: r.execEnv(nil), Dir: req.Dir, Output: &out, Grace: r.Grace})
	if err != nil {
		return "", failure.Systemf("apptainer: run %s: %v", req.Ref.Full, err)
	}
	if res.ExitCode == 0 {
		shell := kit.LastLine(out.String(), "/")
		if shell != "" {
			return shell, nil
		}
	}
	fatal := kit.LastLine(res.Tail, "FATAL:")
	if err := kit.MissingSh(req.Ref.Full, fatal); err != nil {
		return "", err
	}
	if fatal == "" {
		fatal = kit.LastLine(res.Tail)
	}
	return "", failure.Systemf("apptainer could not run image %s (exit code %d): %s", req.Ref.Full, res.ExitCode, fatal)
}

// Release ends the job's lease on the stored SIF.
func (r *Runtime) Release(_ context.Context, img mechanism.Image, _ string) error {
	return r.ReleaseLease(img)
}

// sifEntry is the name of a SIF in the store (see Pull).
var sifEntry = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^sha256-[0-9a-f]{64}\.sif$`) })

// CheckImage accepts only what Pull makes: a SIF entry of the user's store
// and a lease on it.
func (r *Runtime) CheckImage(img mechanism.Image, _ string) error {
	if img.Format != FormatSIF {
		return fmt.Errorf("unknown image format %q", img.Format)
	}
	if err := kit.CheckShell(img.Shell); err != nil {
		return err
	}
	if len(img.RunOptions) > 0 || len(img.Private) > 0 {
		return fmt.Errorf("image %s carries run options or per-job paths that Pull never sets", img.Handle)
	}
	return r.CheckStored(img, sifEntry())
}
