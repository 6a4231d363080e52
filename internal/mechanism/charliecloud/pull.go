package charliecloud

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"sort"
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

// Image formats.
const (
	// FormatStorage: an image directory in ch-image storage, run by name.
	FormatStorage = "storage"
	// FormatSquash: a SquashFS file, mounted by ch-run itself.
	FormatSquash = "squashfs"
	// FormatDir: the job's own image directory outside the storage, run
	// by path (where ch-run -w works); see copyForJob.
	FormatDir = "dir"
)

// busyWait is how long a pull waits for another ch-image to release the
// user's storage (a concurrent job of the same user pulling).
var busyWait = 10 * time.Minute

// Pull makes the image available to the job:
//
//  1. its digest is resolved by the pull policy (kit.ResolveDigest);
//  2. that exact digest is pulled into the user's ch-image storage
//     (stored as NAME@sha256+HEX) unless it is there already; concurrent
//     jobs of the user pull it once;
//  3. with req.SingleFile, it is converted once per digest (and mount-point
//     set) to SquashFS in the user's store (imagecache), and the job takes a
//     lease on that file; else the job gets its own copy in the storage
//     (hard links, or files of its own when its run options may write to
//     the image: see copyForJob). Either way the bind mount points are
//     created in the image (Charliecloud 0.31 cannot bind to a path the
//     image lacks), and its shell is found.
//
// Pulls, conversions and full copies take one of the user's build slots
// (max_concurrent_builds).
func (r *Runtime) Pull(ctx context.Context, req mechanism.PullRequest) (mechanism.Image, error) {
	start := time.Now()
	ctx = kit.StoreTrace(ctx, req.Log)
	img := mechanism.Image{Ref: req.Ref.Full}
	info, err := r.Probe(ctx)
	if err != nil {
		return img, err
	}
	if err := checkStorage(r.Storage); err != nil {
		return img, failure.Systemf("charliecloud: %v", err)
	}
	st, err := r.Store()
	if err != nil {
		return img, failure.Systemf("charliecloud: %v", err)
	}
	// Present means no network is needed: the pulled image (converting it
	// needs no registry), or its converted file.
	present := func(d string) bool {
		return r.inStorage(req.Ref.FamiliarAtDigest(d)) ||
			req.SingleFile && imagecache.ValidSquashFS(st.Path(squashKey(d, req.MountPoints))) == nil
	}
	img.Digest, err = kit.ResolveDigest(ctx, st, req, credentialVariables, registry.Options{SkipVerify: req.Insecure}, present)
	if err != nil {
		return img, err
	}
	if req.SingleFile {
		err = r.squashForJob(ctx, info, st, req, &img)
	} else {
		err = r.copyForJob(ctx, info, st, req, &img)
	}
	if err != nil {
		if img.Lease != "" {
			_ = st.Release(img.Lease)
		}
		return img, err
	}
	if err := st.SetTag(req.Ref.Full, img.Digest); err != nil {
		req.Log.Warnf("could not record the digest of %s: %v", req.Ref.Full, err)
	}
	img.ReadyTime = time.Since(start)
	return img, nil
}

// inStorage reports whether the ch-image storage holds image name.
func (r *Runtime) inStorage(name string) bool {
	_, err := os.Stat(filepath.Join(r.Storage, "img", forPath(name), "ch"))
	return err == nil
}

// ensurePulled puts the image's digest into the storage unless it is
// there. Jobs of the same user that need it at once wait for one another
// (the store's lock), so it is pulled once. takeSlot takes a build slot for
// the pull; false when the caller holds one (a conversion's build).
func (r *Runtime) ensurePulled(ctx context.Context, info mechanism.Info, st *imagecache.Store, req mechanism.PullRequest, digest string, takeSlot bool) (pulled bool, err error) {
	name := req.Ref.FamiliarAtDigest(digest)
	if r.inStorage(name) {
		return false, nil
	}
	if takeSlot {
		// Before the pull lock (the store's lock order): a conversion holds
		// its slot when it takes that lock.
		release, err := st.BuildSlot(ctx)
		if err != nil {
			return false, kit.StoreError(err)
		}
		defer release()
	}
	unlock, err := st.Lock(ctx, "pull-"+strings.ReplaceAll(digest, ":", "-"), "another job of yours is pulling this image")
	if err != nil {
		return false, kit.StoreError(err)
	}
	defer unlock()
	if r.inStorage(name) {
		return false, nil
	}
	if err := r.pull(ctx, info, req, name); err != nil {
		return true, err
	}
	if !r.inStorage(name) {
		return true, failure.Systemf("charliecloud: ch-image pull %s succeeded but the image is not in the storage %s", name, r.Storage)
	}
	return true, nil
}

// copyForJob gives the job its own copy of the stored image, under a
// per-job name, with the mount points, and finds its shell.
//
// The copy is made of hard links in the storage, run by name (one
// directory entry per file, about as fast as listing the image; ch-run
// refuses -w by name, so nothing writes to the shared files), unless the
// admin's run options or the user arguments the admin allows can include
// ch-run -w. -w works only on an image directory run by path, outside the
// storage, and a job could then change the stored image's files through
// shared inodes (every later job would run the changed image). So then the
// copy is a directory of its own in <user>.ci-exec/charliecloud-jobs, run
// by path, whose every file is a copy (reflinked where the file system
// can, so near free on btrfs or XFS, a full copy elsewhere), made under a
// build slot. The choice rests on the configuration only, nothing the job
// or its state file says.
func (r *Runtime) copyForJob(ctx context.Context, info mechanism.Info, st *imagecache.Store, req mechanism.PullRequest, img *mechanism.Image) error {
	t := time.Now()
	pulled, err := r.ensurePulled(ctx, info, st, req, img.Digest, true)
	if err != nil {
		return err
	}
	img.Cache = "hit"
	if pulled {
		img.Cache, img.PullTime = "miss", time.Since(t)
	}
	var copyDir string
	makeCopy := linkTree
	// A GPU job's copy takes the host's libraries (ch-fromhost), which
	// would overwrite files hard-linked to the stored image: it gets
	// files of its own too.
	if r.mayWriteImage() || req.GPU {
		if err := kit.EnsureUserDir(r.jobsDir()); err != nil {
			return failure.Systemf("charliecloud: job image copies: %v", err)
		}
		copyDir = filepath.Join(r.jobsDir(), req.JobKey)
		img.Format, img.Handle = FormatDir, copyDir
		makeCopy = cloneTree
	} else {
		img.Format, img.Handle = FormatStorage, jobImageRepo+":"+req.JobKey
		copyDir = filepath.Join(r.Storage, "img", forPath(img.Handle))
	}
	img.Private = []string{copyDir}
	// A copy left by an earlier attempt of this job (prepare is retried).
	if err := removeTree(copyDir); err != nil {
		return failure.Systemf("charliecloud: remove the old job copy %s: %v", copyDir, err)
	}
	if img.Format == FormatDir {
		release, err := st.BuildSlot(ctx)
		if err != nil {
			return kit.StoreError(err)
		}
		defer release()
		why := "ch-run -w is allowed"
		if req.GPU {
			why = "it gets the host's GPU libraries"
		}
		req.Log.Printf("Copying the image for this job to %s: %s, so the job gets files of its own, not those of your stored image.", copyDir, why)
	}
	lock, err := lockStorage(r.Storage, time.Now().Add(busyWait))
	if err != nil {
		return failure.Systemf("charliecloud: %v", err)
	}
	err = makeCopy(filepath.Join(r.Storage, "img", forPath(req.Ref.FamiliarAtDigest(img.Digest))), copyDir)
	lock.Unlock()
	if err == nil {
		img.Shell, img.RunOptions, err = prepareTree(copyDir, req)
	}
	if err == nil && req.GPU {
		err = r.injectGPU(ctx, info, req, copyDir)
	}
	if err != nil {
		_ = removeTree(copyDir)
		return kit.StoreError(err)
	}
	return nil
}

// fromhostArgv is the command that injects the host's NVIDIA libraries
// and tools into an image directory (pure, golden-tested).
func fromhostArgv(info mechanism.Info, dir string) []string {
	return []string{info.Program("ch-fromhost"), "--nvidia", dir}
}

// injectGPU runs ch-fromhost --nvidia on the job's own image copy.
func (r *Runtime) injectGPU(ctx context.Context, info mechanism.Info, req mechanism.PullRequest, dir string) error {
	if !info.Features[mechanism.FeatureGPU] {
		return failure.Systemf("charliecloud: this GPU job needs ch-fromhost and nvidia-container-cli (NVIDIA's libnvidia-container tools) on this host; install them or run GPU jobs elsewhere (ci-exec check reports what is missing)")
	}
	env := r.toolEnv(auth.Credential{}, false)
	// ch-fromhost runs nvidia-container-cli and ldconfig from PATH.
	env = append(env, "PATH="+filepath.Dir(info.Program("nvidia-container-cli"))+":"+r.ToolPath(toolPath))
	end := req.Log.Section("ch_fromhost", "ch-fromhost --nvidia: the host's GPU libraries into the job's image", false)
	defer end()
	w := req.Log.Writer()
	defer w.Close()
	res, err := kit.RunTool(ctx, kit.Tool{Argv: fromhostArgv(info, dir), Env: env, Dir: req.Dir, Output: w, Grace: r.Grace})
	if err != nil {
		return failure.Systemf("charliecloud: ch-fromhost --nvidia: %v", err)
	}
	if res.ExitCode != 0 {
		return failure.Systemf("charliecloud: ch-fromhost --nvidia failed with exit code %d: %s", res.ExitCode, kit.LastLine(res.Tail))
	}
	return nil
}

// squashKey names a SquashFS entry in the store: the digest and the set of
// mount points made inside it (the same for every job of a user with the
// same data dir and volumes).
func squashKey(digest string, mounts []string) string {
	m := append([]string(nil), mounts...)
	sort.Strings(m)
	h := sha256.Sum256([]byte(strings.Join(m, "\n")))
	return strings.ReplaceAll(digest, ":", "-") + "-" + hex.EncodeToString(h[:6]) + ".sqfs"
}

// squashForJob makes sure the store has the image as SquashFS with the
// job's mount points, converting it once per digest (pulling first if
// needed), and gives the job a lease on it and a mount point of its own.
func (r *Runtime) squashForJob(ctx context.Context, info mechanism.Info, st *imagecache.Store, req mechanism.PullRequest, img *mechanism.Image) error {
	if req.GPU {
		// A SquashFS entry is shared by the user's jobs and read-only.
		return failure.Systemf("charliecloud: a GPU job needs its own image directory for ch-fromhost --nvidia, but this job's image is converted to SquashFS (batch executor or convert = true); run GPU jobs with Apptainer, or without conversion")
	}
	if _, ok := info.Programs["ch-convert"]; !ok {
		return failure.Systemf("charliecloud: ch-convert not found in %s, but this job's image must be converted (batch executor or convert = true); install it or set disable_convert",
			strings.Join(kit.ProgramDirs(r.Cfg.ApplicationPath), ":"))
	}
	key := squashKey(img.Digest, req.MountPoints)
	res, err := st.Ensure(ctx, key, req.JobKey, imagecache.ValidSquashFS, func(ctx context.Context, tmp string) error {
		t := time.Now()
		pulled, err := r.ensurePulled(ctx, info, st, req, img.Digest, false)
		if pulled {
			img.PullTime = time.Since(t)
		}
		if err != nil {
			return err
		}
		t = time.Now()
		defer func() { img.ConvertTime = time.Since(t) }()
		return r.convert(ctx, info, st, req, img.Digest, key, tmp)
	})
	if err != nil {
		return kit.StoreError(err)
	}
	kit.LogDamaged(req.Log, res)
	img.Cache = kit.CacheState(res)
	img.Format = FormatSquash
	img.Handle, img.Lease = res.Path, res.Lease
	if len(img.Handle) > maxImagePath {
		// ch-run 0.31 takes a longer image path for an image name in its
		// storage ("can't stat: STORAGE/img/%..."), which would fail every
		// stage with a misleading line; say what to change instead.
		_ = st.Release(res.Lease)
		return failure.Systemf("charliecloud: the SquashFS image path %s is %d bytes long; ch-run %s cannot run an image whose path is longer than %d bytes: set general.charliecloud.image_storage_dir to a shorter directory",
			img.Handle, len(img.Handle), info.Version, maxImagePath)
	}
	img.Shell = st.Meta(key, "shell")
	if img.Shell == "" {
		return failure.Systemf("charliecloud: the store entry %s has no recorded shell; remove it, it will be rebuilt", res.Path)
	}
	mnt := filepath.Join(req.Dir, req.JobKey+".mnt")
	if err := os.Mkdir(mnt, 0o700); err != nil && !os.IsExist(err) {
		return failure.Systemf("charliecloud: create the SquashFS mount point %s: %v", mnt, err)
	}
	img.Private = []string{mnt}
	img.RunOptions = []string{"--mount=" + mnt}
	if st.Meta(key, "setenv") == "yes" {
		img.RunOptions = append(img.RunOptions, "--set-env")
	}
	return nil
}

// prepareTree creates the mount points in an image directory and reads
// its shell and run options.
func prepareTree(dir string, req mechanism.PullRequest) (shell string, runOptions []string, err error) {
	for _, m := range req.MountPoints {
		if err := mkdirInImage(dir, m); err != nil {
			var sym *errSymlinkInImage
			if errors.As(err, &sym) {
				return "", nil, failure.Userf("image %s cannot be used: %v; use an image without that symlink", req.Ref.Full, err)
			}
			return "", nil, failure.Systemf("charliecloud: %v", err)
		}
	}
	shell, ok := findShell(dir)
	if !ok {
		return "", nil, failure.Userf("image %s has neither bash nor sh (looked for /bin/bash, /usr/bin/bash, /bin/sh, /usr/bin/sh); use an image with a POSIX shell", req.Ref.Full)
	}
	if hasEnvironment(dir) {
		// Load the image's ENV settings (PATH and friends), as other
		// container runtimes do.
		runOptions = []string{"--set-env"}
	}
	return shell, runOptions, nil
}

// pull runs ch-image pull of name (the reference at its digest), waiting
// while another ch-image holds the storage.
func (r *Runtime) pull(ctx context.Context, info mechanism.Info, req mechanism.PullRequest, name string) error {
	argv := r.pullArgv(info, req, name)
	end := req.Log.Section("ch_image_pull", "ch-image pull "+name, false)
	defer end()
	w := req.Log.Writer()
	defer w.Close()
	t := kit.Tool{Argv: argv, Env: r.toolEnv(req.Credential, req.Insecure), Dir: req.Dir, Output: w, Grace: r.Grace}
	if req.Log != nil {
		// ch-image downloads the layers into the storage's dlcache.
		t.Progress = &kit.Progress{What: "ch-image pull", Dirs: []string{filepath.Join(r.Storage, "dlcache")}, Logf: req.Log.Printf}
	}
	res, err := r.runBusy(ctx, t, req)
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
func (r *Runtime) pullArgv(info mechanism.Info, req mechanism.PullRequest, name string) []string {
	argv := []string{info.Program("ch-image")}
	if !req.Credential.Anonymous() {
		// Credentials are used only in authenticated mode; without
		// credentials --auth would make ch-image prompt for them.
		argv = append(argv, "--auth")
	}
	if req.Insecure {
		argv = append(argv, "--tls-no-verify")
	}
	return append(argv, "-s", r.Storage, "pull", name)
}

// runBusy runs a ch-image based tool and repeats it while the storage is
// locked by another ch-image (ch-image fails at once instead of waiting).
func (r *Runtime) runBusy(ctx context.Context, t kit.Tool, req mechanism.PullRequest) (kit.ToolResult, error) {
	deadline := time.Now().Add(busyWait)
	for delay := 250 * time.Millisecond; ; {
		res, err := kit.RunTool(ctx, t)
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
// advice are the shared ones (kit.PullError). ch-image 0.31 reports a
// 401 and a 404 alike ("unauthorized or not in registry").
func classifyPull(ref string, cred auth.Credential, tail, storage string) error {
	last := kit.LastLine(tail, "error:")
	if last == "" {
		last = kit.LastLine(tail)
	}
	kind := kit.PullOther
	switch {
	case strings.Contains(tail, "no further authentication possible"):
		kind = kit.PullAuthRefused
	case strings.Contains(tail, "unauthorized or not in registry"):
		kind = kit.PullNotFound
	case strings.Contains(tail, "CERTIFICATE_VERIFY_FAILED") || strings.Contains(tail, "SSLError"):
		kind = kit.PullTLS
	case strings.Contains(tail, "storage directory seems invalid") || strings.Contains(tail, "invalid storage directory"):
		kind = kit.PullStorage
	case strings.Contains(tail, "Connection refused"):
		// ch-image is Python: its output is all there is to read. The
		// address is urllib3's, "HTTPSConnectionPool(host='H', port=P)".
		kind, last = kit.PullRefused, ""
		if m := poolAddr().FindStringSubmatch(tail); m != nil {
			last = net.JoinHostPort(m[1], m[2])
		}
	case strings.Contains(tail, "Max retries exceeded") ||
		strings.Contains(tail, "Name or service not known") || strings.Contains(tail, "timed out"):
		kind = kit.PullUnreachable
	default:
		last = "ch-image failed: " + last
	}
	return kit.PullError(kind, ref, cred, credentialVariables, storage, last)
}

// poolAddr finds the address in urllib3's "HTTPSConnectionPool(host='H',
// port=P)".
var poolAddr = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`ConnectionPool\(host='([^']+)', port=([0-9]+)\)`) })

// jobsDir holds the job copies run by path (FormatDir):
// <image_storage_dir>/<user>.ci-exec/charliecloud-jobs, next to the store
// and on the same file system as the storage as a rule (so copies can be
// reflinks), but not inside the storage, whose directories ch-run runs only
// by name.
func (r *Runtime) jobsDir() string {
	return filepath.Join(filepath.Dir(r.StoreRoot()), Name+"-jobs")
}

// jobKeyRE is the form of a per-job key (mechanism.PullRequest.JobKey).
var jobKeyRE = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^[a-z0-9][a-z0-9-]*$`) })

// Release ends the job's lease on a stored SquashFS file and removes its
// own copies: its directory in the storage (img/ci-exec-job+KEY) or in
// the jobs dir (charliecloud-jobs/KEY), or its mount point in jobDir
// (KEY.mnt). Nothing else is ever removed, whatever the state file says.
func (r *Runtime) Release(_ context.Context, img mechanism.Image, jobDir string) error {
	errs := []error{r.ReleaseLease(img)}
	imgDir := filepath.Join(r.Storage, "img")
	for _, p := range img.Private {
		p = filepath.Clean(p)
		dir, base := filepath.Split(p)
		dir = filepath.Clean(dir)
		key, isCopy := strings.CutPrefix(base, forPath(jobImageRepo+":"))
		ext := filepath.Ext(base)
		switch {
		case isCopy && dir == imgDir && jobKeyRE().MatchString(key),
			dir == r.jobsDir() && jobKeyRE().MatchString(base):
			if err := removeTree(p); err != nil {
				errs = append(errs, err)
			}
		case jobDir != "" && dir == filepath.Clean(jobDir) && ext == ".mnt" && jobKeyRE().MatchString(strings.TrimSuffix(base, ext)):
			if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, err)
			}
		default:
			errs = append(errs, fmt.Errorf("not removing %s: not a per-job image path", p))
		}
	}
	return errors.Join(errs...)
}

// maxImagePath is the longest image path ch-run 0.31 is taken to run as a
// path (measured here: a 249-byte path works, a 259-byte one is taken for
// a name in the storage).
const maxImagePath = 255

// squashEntry is the name of a SquashFS entry in the store (squashKey).
var squashEntry = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^sha256-[0-9a-f]{64}-[0-9a-f]{12}\.sqfs$`) })

// CheckImage accepts only what Pull makes: a per-job copy in the storage
// by name or in the jobs dir by path (run options: at most --set-env), or
// a SquashFS entry of the
// user's store with a lease and a mount point in jobDir (run options:
// that --mount and --set-env). Anything else in a state file, a planted
// --bind above all, is refused.
func (r *Runtime) CheckImage(img mechanism.Image, jobDir string) error {
	if err := kit.CheckShell(img.Shell); err != nil {
		return err
	}
	allowed := map[string]bool{"--set-env": true}
	switch img.Format {
	case FormatStorage:
		key, ok := strings.CutPrefix(img.Handle, jobImageRepo+":")
		if !ok || !jobKeyRE().MatchString(key) || img.Lease != "" {
			return fmt.Errorf("image %s is not a per-job copy", img.Handle)
		}
		if len(img.Private) != 1 || img.Private[0] != filepath.Join(r.Storage, "img", forPath(img.Handle)) {
			return fmt.Errorf("image %s lists paths that are not its copy", img.Handle)
		}
	case FormatDir:
		key := filepath.Base(img.Handle)
		if filepath.Dir(filepath.Clean(img.Handle)) != r.jobsDir() || !jobKeyRE().MatchString(key) || img.Lease != "" {
			return fmt.Errorf("image %s is not a per-job copy in %s", img.Handle, r.jobsDir())
		}
		if len(img.Private) != 1 || filepath.Clean(img.Private[0]) != filepath.Clean(img.Handle) {
			return fmt.Errorf("image %s lists paths that are not its copy", img.Handle)
		}
	case FormatSquash:
		if err := r.CheckStored(img, squashEntry()); err != nil {
			return err
		}
		if len(img.Private) != 1 {
			return fmt.Errorf("image %s has no single mount point", img.Handle)
		}
		mnt := filepath.Clean(img.Private[0])
		key := strings.TrimSuffix(filepath.Base(mnt), ".mnt")
		if filepath.Dir(mnt) != filepath.Clean(jobDir) || !strings.HasSuffix(mnt, ".mnt") || !jobKeyRE().MatchString(key) {
			return fmt.Errorf("mount point %s is not in the job's state dir", mnt)
		}
		allowed["--mount="+mnt] = true
	default:
		return fmt.Errorf("unknown image format %q", img.Format)
	}
	for _, o := range img.RunOptions {
		if !allowed[o] {
			return fmt.Errorf("run option %q was not chosen by ci-exec", o)
		}
	}
	return nil
}
