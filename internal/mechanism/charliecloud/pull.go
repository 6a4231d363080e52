package charliecloud

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
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
)

// Image formats.
const (
	// FormatStorage: an image directory in ch-image storage, run by name.
	FormatStorage = "storage"
	// FormatSquash: a SquashFS file, mounted by ch-run itself.
	FormatSquash = "squashfs"
)

// busyWait is how long a pull waits for another ch-image to release the
// user's storage (a concurrent job of the same user pulling).
var busyWait = 10 * time.Minute

// Pull fetches the image into the user's storage (per the pull policy),
// gives the job its own hard-linked copy under a per-job name, creates the
// bind mount points in that copy and finds the copy's shell.
func (r *Runtime) Pull(ctx context.Context, req mechanism.PullRequest) (mechanism.Image, error) {
	start := time.Now()
	img := mechanism.Image{Ref: req.Ref.Full, Format: FormatStorage}
	info, err := r.Probe(ctx)
	if err != nil {
		return img, err
	}
	if err := checkStorage(r.Storage); err != nil {
		return img, failure.Systemf("charliecloud: %v", err)
	}
	name := req.Ref.Familiar
	present := func() bool {
		_, err := os.Stat(filepath.Join(r.Storage, "img", forPath(name), "ch"))
		return err == nil
	}
	switch {
	case req.Policy == config.PullNever && !present():
		return img, failure.Userf("image %s is not in your image storage %s and the pull policy is %q; ask the admin, or pull it once in a job with another policy",
			req.Ref.Full, r.Storage, config.PullNever)
	case req.Policy == config.PullIfNotPresent && present():
		req.Log.Printf("Image %s is already in the storage (pull policy %s).", req.Ref.Full, req.Policy)
	case req.Policy == config.PullNever:
	default:
		if err := r.pull(ctx, info, req); err != nil {
			return img, err
		}
	}

	img.Handle = jobImageRepo + ":" + req.JobKey
	copyDir := filepath.Join(r.Storage, "img", forPath(img.Handle))
	img.Private = []string{copyDir}
	lock, err := lockStorage(r.Storage, time.Now().Add(busyWait))
	if err != nil {
		return img, failure.Systemf("charliecloud: %v", err)
	}
	err = r.copyForJob(name, copyDir, &img, req.Ref)
	lock.Unlock()
	if err != nil {
		_ = removeTree(copyDir)
		return img, err
	}
	for _, m := range req.MountPoints {
		if err := mkdirInImage(copyDir, m); err != nil {
			_ = removeTree(copyDir)
			var sym *errSymlinkInImage
			if errors.As(err, &sym) {
				return img, failure.Userf("image %s cannot be used: %v; use an image without that symlink", req.Ref.Full, err)
			}
			return img, failure.Systemf("charliecloud: %v", err)
		}
	}
	shell, ok := findShell(copyDir)
	if !ok {
		_ = removeTree(copyDir)
		return img, failure.Userf("image %s has neither bash nor sh (looked for /bin/bash, /usr/bin/bash, /bin/sh, /usr/bin/sh); use an image with a POSIX shell", req.Ref.Full)
	}
	img.Shell = shell
	if hasEnvironment(copyDir) {
		// Load the image's ENV settings (PATH and friends), as other
		// container runtimes do.
		img.RunOptions = append(img.RunOptions, "--set-env")
	}
	img.PullTime = time.Since(start)
	return img, nil
}

// copyForJob makes the job's copy of the stored image (the caller holds the
// storage lock, so no ch-image changes the original meanwhile) and reads
// its digest.
func (r *Runtime) copyForJob(name, copyDir string, img *mechanism.Image, ref mechanism.Ref) error {
	orig := filepath.Join(r.Storage, "img", forPath(name))
	if _, err := os.Stat(filepath.Join(orig, "ch")); err != nil {
		return failure.Systemf("charliecloud: image %s is not in the storage after the pull (%v)", ref.Full, err)
	}
	// A copy left by an earlier attempt of this job (prepare is retried).
	if err := removeTree(copyDir); err != nil {
		return failure.Systemf("charliecloud: remove the old job copy %s: %v", copyDir, err)
	}
	if err := linkTree(orig, copyDir); err != nil {
		return failure.Systemf("charliecloud: copy image %s for the job: %v", ref.Full, err)
	}
	img.Digest = ref.Digest
	if img.Digest == "" {
		img.Digest = storedDigest(r.Storage, name)
	}
	return nil
}

// storedDigest is the digest of the manifest ch-image downloaded for name:
// the sha256 of the file as the registry served it, which is the digest the
// registry reports for the tag ("" when unknown).
func storedDigest(storage, name string) string {
	for _, f := range []string{forPath(name) + ".fat.json", forPath(name) + "%skinny.manifest.json"} {
		b, err := os.ReadFile(filepath.Join(storage, "dlcache", f))
		if err == nil {
			sum := sha256.Sum256(b)
			return "sha256:" + hex.EncodeToString(sum[:])
		}
	}
	return ""
}

// pull runs ch-image pull, waiting while another ch-image holds the
// storage.
func (r *Runtime) pull(ctx context.Context, info mechanism.Info, req mechanism.PullRequest) error {
	argv := r.pullArgv(info, req)
	end := req.Log.Section("ch_image_pull", "ch-image pull "+req.Ref.Full, false)
	defer end()
	w := req.Log.Writer()
	defer w.Close()
	res, err := r.runBusy(ctx, mechanism.Tool{Argv: argv, Env: r.toolEnv(req.Credential, req.Insecure), Dir: req.Dir, Output: w, Grace: r.Grace}, req)
	if err != nil {
		return failure.Systemf("charliecloud: ch-image pull %s: %v", req.Ref.Full, err)
	}
	if res.ExitCode != 0 {
		return classifyPull(req.Ref.Full, req.Credential, res.Tail, r.Storage)
	}
	return nil
}

// pullArgv is the ch-image pull command line (pure). No credential is ever
// part of it: they travel in the environment (toolEnv).
func (r *Runtime) pullArgv(info mechanism.Info, req mechanism.PullRequest) []string {
	argv := []string{info.Program("ch-image")}
	if !req.Credential.Anonymous() {
		// Credentials are used only in authenticated mode; without
		// credentials --auth would make ch-image prompt for them.
		argv = append(argv, "--auth")
	}
	if req.Insecure {
		argv = append(argv, "--tls-no-verify")
	}
	return append(argv, "-s", r.Storage, "pull", req.Ref.Familiar)
}

// runBusy runs a ch-image based tool and repeats it while the storage is
// locked by another ch-image (ch-image fails at once instead of waiting).
func (r *Runtime) runBusy(ctx context.Context, t mechanism.Tool, req mechanism.PullRequest) (mechanism.ToolResult, error) {
	deadline := time.Now().Add(busyWait)
	for delay := 250 * time.Millisecond; ; {
		res, err := mechanism.RunTool(ctx, t)
		if err != nil || res.ExitCode == 0 || !strings.Contains(res.Tail, "storage directory is already in use") {
			return res, err
		}
		if time.Now().After(deadline) {
			return res, fmt.Errorf("the image storage %s stayed busy (another ch-image) for %s", r.Storage, busyWait)
		}
		if req.Log != nil {
			req.Log.Printf("The image storage is busy (another job of yours is pulling); retrying in %s.", delay)
		}
		select {
		case <-ctx.Done():
			return res, ctx.Err()
		case <-time.After(delay):
		}
		delay = min(2*delay, 5*time.Second)
	}
}

// classifyPull reads a failed ch-image pull's output; the class and the
// advice are the shared ones (mechanism.PullError). ch-image 0.31 reports a
// 401 and a 404 alike ("unauthorized or not in registry").
func classifyPull(ref string, cred auth.Credential, tail, storage string) error {
	last := mechanism.LastLine(tail, "error:")
	if last == "" {
		last = mechanism.LastLine(tail)
	}
	kind := mechanism.PullOther
	switch {
	case strings.Contains(tail, "no further authentication possible"):
		kind = mechanism.PullAuthRefused
	case strings.Contains(tail, "unauthorized or not in registry"):
		kind = mechanism.PullNotFound
	case strings.Contains(tail, "CERTIFICATE_VERIFY_FAILED") || strings.Contains(tail, "SSLError"):
		kind = mechanism.PullTLS
	case strings.Contains(tail, "storage directory seems invalid") || strings.Contains(tail, "invalid storage directory"):
		kind = mechanism.PullStorage
	case strings.Contains(tail, "Max retries exceeded") || strings.Contains(tail, "Connection refused") ||
		strings.Contains(tail, "Name or service not known") || strings.Contains(tail, "timed out"):
		kind = mechanism.PullUnreachable
	default:
		last = "ch-image failed: " + last
	}
	return mechanism.PullError(kind, ref, cred, credentialVariables, storage, last)
}

// jobKeyRE is the form of a per-job key (mechanism.PullRequest.JobKey).
var jobKeyRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]*$`)

// Release removes the job's copies of img: its directory in the storage
// (img/ci-exec-job+KEY) or its converted file and mount point in jobDir
// (KEY.sqfs, KEY.mnt). Nothing else is ever removed, whatever the state
// file says.
func (r *Runtime) Release(_ context.Context, img mechanism.Image, jobDir string) error {
	var errs []error
	imgDir := filepath.Join(r.Storage, "img")
	for _, p := range img.Private {
		p = filepath.Clean(p)
		dir, base := filepath.Split(p)
		dir = filepath.Clean(dir)
		key, isCopy := strings.CutPrefix(base, forPath(jobImageRepo+":"))
		ext := filepath.Ext(base)
		switch {
		case isCopy && dir == imgDir && jobKeyRE.MatchString(key):
			if err := removeTree(p); err != nil {
				errs = append(errs, err)
			}
		case jobDir != "" && dir == filepath.Clean(jobDir) && (ext == ".sqfs" || ext == ".mnt") && jobKeyRE.MatchString(strings.TrimSuffix(base, ext)):
			if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, err)
			}
		default:
			errs = append(errs, fmt.Errorf("not removing %s: not a per-job image path", p))
		}
	}
	return errors.Join(errs...)
}
