package apptainer

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/registry"
)

// FormatSIF is the only image format: a SIF file.
const FormatSIF = "sif"

// sifName is the flat file name of a reference's tag record, made with
// characters no reference contains, so two references never share one
// ("127.0.0.1:5443/ci/tiny:latest" is "127.0.0.1+5443%ci%tiny+latest.sif").
func sifName(ref string) string {
	return strings.NewReplacer("/", "%", ":", "+", "@", "=").Replace(ref) + ".sif"
}

// Pull makes the image available as a SIF in the user's storage, keyed by
// its manifest digest (images/sha256-HEX.sif), and gives the job its own
// hard link to it, so that a later pull of the same tag by another job
// cannot change the image under this one. The tag's digest is asked from
// the registry (pull policy "always"; no pull when that digest is already
// stored) or taken from the last pull of the tag (tags/NAME, for
// "if-not-present" and "never"), and exactly that digest is pulled.
func (r *Runtime) Pull(ctx context.Context, req mechanism.PullRequest) (mechanism.Image, error) {
	start := time.Now()
	img := mechanism.Image{Ref: req.Ref.Full, Format: FormatSIF}
	info, err := r.Probe(ctx)
	if err != nil {
		return img, err
	}
	if err := r.prepareDirs(); err != nil {
		return img, failure.Systemf("apptainer: %v", err)
	}
	tagFile := filepath.Join(r.Storage, "tags", sifName(req.Ref.Full))
	digest := req.Ref.Digest
	if digest == "" && req.Policy != config.PullAlways {
		digest = r.storedTag(tagFile)
	}
	if digest == "" && req.Policy != config.PullNever {
		if digest, err = registry.Digest(ctx, req.Ref.Full, req.Credential, registry.Options{PlainHTTP: req.Insecure}); err != nil {
			return img, mechanism.DigestError(err, req.Ref.Full, req.Credential, credentialVariables)
		}
	}
	if digest == "" {
		return img, r.notPresent(req)
	}
	img.Digest = digest
	stored := filepath.Join(r.Storage, "images", strings.ReplaceAll(digest, ":", "-")+".sif")
	switch {
	case isFile(stored):
		req.Log.Printf("Image %s@%s is already in the storage: not pulled (pull policy %s).", req.Ref.Full, digest, req.Policy)
	case req.Policy == config.PullNever:
		return img, r.notPresent(req)
	default:
		if err := r.pull(ctx, info, req, req.Ref.AtDigest(digest), stored); err != nil {
			return img, err
		}
	}
	if err := writeFileAtomic(tagFile, digest+"\n"); err != nil {
		req.Log.Warnf("could not record the digest of %s: %v", req.Ref.Full, err)
	}

	img.Handle = stored
	jobSIF := filepath.Join(req.Dir, req.JobKey+".sif")
	_ = os.Remove(jobSIF) // left by an earlier attempt of this job (prepare is retried)
	if err := os.Link(stored, jobSIF); err == nil {
		img.Handle, img.Private = jobSIF, []string{jobSIF}
	} else {
		req.Log.Printf("The job uses %s in place (no hard link into its directory: %v).", stored, err)
	}
	if img.Shell, err = r.findShell(ctx, info, img.Handle, req); err != nil {
		_ = r.Release(ctx, img, req.Dir)
		return img, err
	}
	img.PullTime = time.Since(start)
	return img, nil
}

func (r *Runtime) notPresent(req mechanism.PullRequest) error {
	return failure.Userf("image %s is not in your image storage %s and the pull policy is %q; ask the admin, or pull it once in a job with another policy",
		req.Ref.Full, r.Storage, req.Policy)
}

// storedTag is the digest the last pull of a tag got ("" if unknown or its
// SIF is gone).
func (r *Runtime) storedTag(tagFile string) string {
	b, err := os.ReadFile(tagFile)
	d := strings.TrimSpace(string(b))
	if err != nil || !digestRE.MatchString(d) || !isFile(filepath.Join(r.Storage, "images", strings.ReplaceAll(d, ":", "-")+".sif")) {
		return ""
	}
	return d
}

var digestRE = regexp.MustCompile(`^sha256:[a-f0-9]{64}$`)

func isFile(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular()
}

// writeFileAtomic replaces path with content (temp file and rename).
func writeFileAtomic(path, content string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.WriteString(content); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// prepareDirs makes the user's storage, cache and tmp dirs, checking those
// in admin-chosen (possibly shared) parents.
func (r *Runtime) prepareDirs() error {
	if err := mechanism.EnsureUserDir(r.Storage); err != nil {
		return fmt.Errorf("image storage: %w", err)
	}
	if err := os.MkdirAll(filepath.Join(r.Storage, "images"), 0o700); err != nil {
		return err
	}
	for _, d := range []struct{ key, root, dir string }{{"cache_dir", r.Cfg.CacheDir, r.cacheDir()}, {"tmp_dir", r.Cfg.TmpDir, r.tmpDir()}} {
		var err error
		if d.root == "" {
			err = os.MkdirAll(d.dir, 0o700)
		} else {
			err = mechanism.EnsureUserDir(d.dir)
		}
		if err != nil {
			return fmt.Errorf("general.apptainer.%s: %w", d.key, err)
		}
	}
	return nil
}

// pull runs apptainer pull of source (the reference at its digest) into a
// temporary name next to stored and renames it into place, so that a job
// never sees a half-written SIF.
func (r *Runtime) pull(ctx context.Context, info mechanism.Info, req mechanism.PullRequest, source, stored string) error {
	tmp := fmt.Sprintf("%s.pulling-%s-%d", stored, req.JobKey, os.Getpid())
	defer os.Remove(tmp)
	end := req.Log.Section("apptainer_pull", "apptainer pull "+req.Ref.Full, false)
	w := req.Log.Writer()
	res, err := mechanism.RunTool(ctx, mechanism.Tool{Argv: r.pullArgv(info, req, source, tmp), Env: r.toolEnv(req.Credential), Dir: req.Dir, Output: w, Grace: r.Grace})
	w.Close()
	end()
	if err != nil {
		return failure.Systemf("apptainer: apptainer pull %s: %v", req.Ref.Full, err)
	}
	if res.ExitCode != 0 {
		return classifyPull(req.Ref.Full, req.Credential, res.Tail, r.Storage)
	}
	if err := os.Rename(tmp, stored); err != nil {
		return failure.Systemf("apptainer: store the pulled image: %v", err)
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
// advice are the shared ones (mechanism.PullError).
func classifyPull(ref string, cred auth.Credential, tail, storage string) error {
	last := mechanism.LastLine(tail, "FATAL:", "ERROR:")
	if last == "" {
		last = mechanism.LastLine(tail)
	}
	// The FATAL line decides: INFO and WARNING lines before it may contain
	// the same words harmlessly ("gocryptfs not found").
	kind := mechanism.PullOther
	switch {
	case strings.Contains(last, "authentication required") || strings.Contains(last, "unauthorized"):
		kind = mechanism.PullAuthRefused
	case strings.Contains(last, "manifest unknown") || strings.Contains(last, "name unknown") || strings.Contains(last, "not found"):
		kind = mechanism.PullNotFound
	case strings.Contains(last, "server gave HTTP response to HTTPS client"):
		kind = mechanism.PullPlainHTTP
	case strings.Contains(last, "x509:") || strings.Contains(last, "certificate"):
		kind = mechanism.PullTLS
	case strings.Contains(last, "connection refused") || strings.Contains(last, "no such host") ||
		strings.Contains(last, "i/o timeout") || strings.Contains(last, "dial tcp"):
		kind = mechanism.PullUnreachable
	case strings.Contains(last, "no space left on device"):
		kind = mechanism.PullStorage
	default:
		last = "apptainer pull failed: " + last
	}
	return mechanism.PullError(kind, ref, cred, credentialVariables, storage, last)
}

// shellProbe prints the shell stage scripts should run with. It is a fixed
// script: no user data is ever part of it.
const shellProbe = `for s in /bin/bash /usr/bin/bash; do if [ -x "$s" ]; then echo "$s"; exit 0; fi; done; echo /bin/sh`

// findShell picks the image's shell for stage scripts: bash when it has
// one, else sh (the runner's scripts work in both). Apptainer cannot look
// into a SIF without running it, so this runs the image's sh once.
func (r *Runtime) findShell(ctx context.Context, info mechanism.Info, sif string, req mechanism.PullRequest) (string, error) {
	var out strings.Builder
	argv := []string{info.Program("apptainer"), "exec", "--cleanenv", sif, "/bin/sh", "-c", shellProbe}
	res, err := mechanism.RunTool(ctx, mechanism.Tool{Argv: argv, Env: r.execEnv(nil), Dir: req.Dir, Output: &out, Grace: r.Grace})
	if err != nil {
		return "", failure.Systemf("apptainer: run %s: %v", req.Ref.Full, err)
	}
	if res.ExitCode == 0 {
		shell := mechanism.LastLine(out.String(), "/")
		if shell != "" {
			return shell, nil
		}
	}
	fatal := mechanism.LastLine(res.Tail, "FATAL:")
	if strings.Contains(fatal, "/bin/sh") && (strings.Contains(fatal, "no such file") || strings.Contains(fatal, "not found")) {
		return "", failure.Userf("image %s has no /bin/sh; use an image with a POSIX shell", req.Ref.Full)
	}
	if fatal == "" {
		fatal = mechanism.LastLine(res.Tail)
	}
	return "", failure.Systemf("apptainer could not run image %s (exit code %d): %s", req.Ref.Full, res.ExitCode, fatal)
}

// Convert returns img unchanged: a SIF is already the single file a batch
// job needs.
func (r *Runtime) Convert(_ context.Context, img mechanism.Image, _ mechanism.ConvertRequest) (mechanism.Image, error) {
	return img, nil
}

// jobSIFRE is the name of a per-job SIF link (mechanism.PullRequest.JobKey).
var jobSIFRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]*\.sif$`)

// Release removes the job's own link to the image (jobDir/KEY.sif).
// Nothing else is ever removed, whatever the state file says, and nothing
// in the storage (stored SIFs are named sha256-HEX.sif, which a key could
// look like).
func (r *Runtime) Release(_ context.Context, img mechanism.Image, jobDir string) error {
	var errs []error
	storage := filepath.Clean(r.Storage) + string(filepath.Separator)
	for _, p := range img.Private {
		p = filepath.Clean(p)
		if jobDir == "" || filepath.Dir(p) != filepath.Clean(jobDir) || !jobSIFRE.MatchString(filepath.Base(p)) ||
			strings.HasPrefix(p, storage) {
			errs = append(errs, fmt.Errorf("not removing %s: not a per-job image path", p))
			continue
		}
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
