package podman

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/imagecache"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/mechanism/kit"
	"github.com/ci-exec/ci-exec/internal/proc"
	"github.com/ci-exec/ci-exec/internal/registry"
)

// FormatPodman is the only image format: an image in the user's Podman
// storage, named by its ID.
const FormatPodman = "podman"

// imagesLock serialises what changes the set of images in the user's
// Podman storage (a pull and its record; an eviction's rmi), so that an
// eviction never removes an image a pull has just recorded.
const imagesLock = "podman-images"

// storeKey is the store entry of a digest: its record.
func storeKey(digest string) string { return strings.ReplaceAll(digest, ":", "-") + ".podman" }

// A record is the store entry of one pulled digest: "ID SIZE\n", the
// image's ID in the user's Podman storage and its size in bytes (what it
// counts against cache_max_size).
type record struct {
	ID   string
	Size int64
}

var imageID = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^[0-9a-f]{64}$`) })

func readRecord(path string) (record, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return record{}, err
	}
	f := strings.Fields(string(b))
	if len(f) != 2 || !imageID().MatchString(f[0]) {
		return record{}, fmt.Errorf("%s is not an image record", path)
	}
	n, err := strconv.ParseInt(f[1], 10, 64)
	if err != nil || n < 0 {
		return record{}, fmt.Errorf("%s is not an image record", path)
	}
	return record{ID: f[0], Size: n}, nil
}

// recordSize is what an entry counts against cache_max_size.
func recordSize(path string) int64 {
	rec, err := readRecord(path)
	if err != nil {
		return 0
	}
	return rec.Size
}

// Pull makes the image available in the user's Podman storage: the digest
// is resolved by the pull policy (kit.ResolveDigest), exactly that digest
// is pulled unless the store records it (and Podman still has the image),
// concurrent jobs pull it once (imagecache.Store.Ensure), and the job takes
// a lease on the record, so eviction leaves the image alone until cleanup.
// Podman's storage is a single place already, so req.SingleFile needs
// nothing more, and binds to paths missing in the image just work.
func (r *Runtime) Pull(ctx context.Context, req mechanism.PullRequest) (mechanism.Image, error) {
	start := time.Now()
	ctx = kit.StoreTrace(ctx, req.Log)
	img := mechanism.Image{Ref: req.Ref.Full, Format: FormatPodman}
	info, err := r.Probe(ctx)
	if err != nil {
		return img, err
	}
	if err := r.prepareDirs(); err != nil {
		return img, failure.Systemf("podman: %v", err)
	}
	st, err := r.Store()
	if err != nil {
		return img, failure.Systemf("podman: %v", err)
	}
	img.Digest, err = kit.ResolveDigest(ctx, st, req, credentialVariables, registry.Options{PlainHTTP: req.Insecure},
		func(d string) bool { return r.validRecord(ctx, info, st.Path(storeKey(d))) == nil })
	if err != nil {
		return img, err
	}
	k := storeKey(img.Digest)
	res, err := st.Ensure(ctx, k, req.JobKey, func(p string) error { return r.validRecord(ctx, info, p) }, func(ctx context.Context, tmp string) error {
		t := time.Now()
		defer func() { img.PullTime = time.Since(t) }()
		return r.pull(ctx, info, st, req, req.Ref.AtDigest(img.Digest), tmp)
	})
	if err != nil {
		return img, kit.StoreError(err)
	}
	kit.LogDamaged(req.Log, res)
	img.Cache = kit.CacheState(res)
	if err := st.SetTag(req.Ref.Full, img.Digest); err != nil {
		req.Log.Warnf("could not record the digest of %s: %v", req.Ref.Full, err)
	}
	rec, err := readRecord(res.Path)
	if err != nil {
		_ = st.Release(res.Lease)
		return img, failure.Systemf("podman: %v", err)
	}
	img.Handle, img.Lease = rec.ID, res.Lease
	img.RunOptions = r.entryPoint(runnerRole(req.JobKey))
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

// runnerRole tells the runner_image's pull from the job image's: stages
// give it the job key with "-runner" appended.
func runnerRole(jobKey string) bool { return strings.HasSuffix(jobKey, "-runner") }

// entryPoint is the image's run options: the admin's entry point for its
// role, if any.
func (r *Runtime) entryPoint(runner bool) []string {
	if runner {
		return entryPointOptions(r.Cfg.RunnerEntryPoint)
	}
	return entryPointOptions(r.Cfg.UserEntryPoint)
}

// prepareDirs makes the user's storage and podman's dirs in it, checking
// those in admin-chosen (possibly shared) parents.
func (r *Runtime) prepareDirs() error {
	if err := kit.EnsureUserDir(r.Storage); err != nil {
		return fmt.Errorf("image storage: %w", err)
	}
	if err := kit.EnsureUserDir(r.runDir()); err != nil {
		return fmt.Errorf("podman run dir: %w", err)
	}
	for _, d := range []string{r.graphRoot(), r.runRoot(), r.xdgRuntime(), r.xdgConfig(), r.xdgData()} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return fmt.Errorf("image storage: %w", err)
		}
	}
	if r.Cfg.TmpDir == "" {
		return os.MkdirAll(r.tmpDir(), 0o700)
	}
	if err := kit.EnsureUserDir(r.tmpDir()); err != nil {
		return fmt.Errorf("general.podman.tmp_dir: %w", err)
	}
	return nil
}

// query runs a short podman command (no credentials) and returns its
// stdout; a non-zero exit is an error with podman's own error line.
func (r *Runtime) query(ctx context.Context, info mechanism.Info, args ...string) (string, error) {
	argv := append(r.globalArgs(info), args...)
	out, errOut, res, err := proc.Output(ctx, proc.Cmd{Argv: argv, Env: r.baseEnv(), Dir: r.Storage})
	if err != nil {
		return "", err
	}
	if res.ExitCode != 0 {
		line := kit.LastLine(string(errOut), "Error:")
		if line == "" {
			line = kit.LastLine(string(errOut))
		}
		return "", fmt.Errorf("podman %s: exit code %d: %s", args[0], res.ExitCode, line)
	}
	return string(out), nil
}

// validRecord checks a record and that Podman still has its image.
func (r *Runtime) validRecord(ctx context.Context, info mechanism.Info, path string) error {
	rec, err := readRecord(path)
	if err != nil {
		return err
	}
	out, err := r.query(ctx, info, "image", "inspect", "--format", "{{.Id}}", rec.ID)
	if err != nil {
		return fmt.Errorf("image %s is gone from the Podman storage: %v", rec.ID, err)
	}
	if strings.TrimSpace(out) != rec.ID {
		return fmt.Errorf("image %s is not what the Podman storage has (%s)", rec.ID, kit.OneLine(out))
	}
	return nil
}

// pull runs podman pull of source (the reference at its digest) and
// writes its record to tmp, which Ensure publishes.
func (r *Runtime) pull(ctx context.Context, info mechanism.Info, st *imagecache.Store, req mechanism.PullRequest, source, tmp string) error {
	unlock, err := st.Lock(ctx, imagesLock, "another job of yours is changing your Podman images")
	if err != nil {
		return err
	}
	defer unlock()
	authFile, err := r.writeAuthFile(req)
	if err != nil {
		return failure.Systemf("podman: write the registry credentials for %s: %v", req.Ref.Full, err)
	}
	if authFile != "" {
		defer os.Remove(authFile)
	}
	end := req.Log.Section("podman_pull", "podman pull "+source, false)
	w := req.Log.Writer()
	res, err := kit.RunTool(ctx, kit.Tool{Argv: r.pullArgv(info, req, source, authFile), Env: r.toolEnv(), Dir: req.Dir, Output: w, Grace: r.Grace})
	w.Close()
	end()
	if err != nil {
		return failure.Systemf("podman: podman pull %s: %v", req.Ref.Full, err)
	}
	if res.ExitCode != 0 {
		return classifyPull(req.Ref.Full, req.Credential, res.Tail, r.Storage)
	}
	out, err := r.query(ctx, info, "image", "inspect", "--format", "{{.Id}} {{.Size}}", source)
	if err != nil {
		return failure.Systemf("podman: the pulled image %s: %v", source, err)
	}
	f := strings.Fields(out)
	if len(f) != 2 || !imageID().MatchString(f[0]) {
		return failure.Systemf("podman: podman image inspect %s said %q, not an image ID and size", source, kit.OneLine(out))
	}
	return os.WriteFile(tmp, []byte(f[0]+" "+f[1]+"\n"), 0o600)
}

// pullArgv is the podman pull command line (pure). No credential is ever
// part of it: they are in authFile.
func (r *Runtime) pullArgv(info mechanism.Info, req mechanism.PullRequest, source, authFile string) []string {
	argv := append(r.globalArgs(info), "pull")
	if authFile != "" {
		argv = append(argv, "--authfile", authFile)
	}
	if req.Insecure {
		argv = append(argv, "--tls-verify=false")
	}
	return append(argv, "docker://"+source)
}

// authFileName is the per-job credential file in the job's state dir.
func authFileName(dir, jobKey string) string {
	return filepath.Join(dir, "podman-auth-"+jobKey+".json")
}

// writeAuthFile writes the pull's credential for --authfile, 0600, in the
// job's state dir ("" when the pull is anonymous).
func (r *Runtime) writeAuthFile(req mechanism.PullRequest) (string, error) {
	return kit.WriteAuthFile(authFileName(req.Dir, req.JobKey), req)
}

// classifyPull reads a failed podman pull's output; the class and the
// advice are the shared ones (kit.PullError).
func classifyPull(ref string, cred auth.Credential, tail, storage string) error {
	last := kit.LastLine(tail, "Error:")
	if last == "" {
		last = kit.LastLine(tail)
	}
	kind, last := kit.GoPullFailure("podman", last, tail)
	return kit.PullError(kind, ref, cred, credentialVariables, storage, last)
}

// findShell picks the image's shell for stage scripts: bash when it has
// one, else sh. It runs the image's sh once, without network.
func (r *Runtime) findShell(ctx context.Context, info mechanism.Info, id string, req mechanism.PullRequest) (string, error) {
	var out strings.Builder
	argv := append(r.globalArgs(info), "run", "--rm", "--pull", "never", "--network", "none", "--log-driver", "none",
		"--entrypoint", "/bin/sh", id, "-c", kit.ShellProbe)
	res, err := kit.RunTool(ctx, kit.Tool{Argv: argv, Env: r.baseEnv(), Dir: req.Dir, Output: &out, Grace: r.Grace})
	if err != nil {
		return "", failure.Systemf("podman: run %s: %v", req.Ref.Full, err)
	}
	if res.ExitCode == 0 {
		if shell := kit.LastLine(out.String(), "/"); shell != "" {
			return shell, nil
		}
	}
	line := kit.LastLine(res.Tail, "Error:")
	if err := kit.MissingSh(req.Ref.Full, line); err != nil {
		return "", err
	}
	if line == "" {
		line = kit.LastLine(res.Tail)
	}
	return "", failure.Systemf("podman could not run image %s (exit code %d): %s", req.Ref.Full, res.ExitCode, line)
}

// Release removes the job's container for img (a stage that was killed
// leaves it; --rm removes it otherwise), its credential file, and ends
// its lease on the stored record.
func (r *Runtime) Release(ctx context.Context, img mechanism.Image, jobDir string) error {
	var errs []string
	if name, err := containerName(img.Lease); err == nil {
		_ = os.Remove(authFileName(jobDir, filepath.Base(img.Lease)))
		if info, err := r.Probe(ctx); err == nil {
			if _, err := r.query(ctx, info, "rm", "--force", "--ignore", "--time", "0", name); err != nil {
				errs = append(errs, err.Error())
			}
		}
	}
	if err := r.ReleaseLease(img); err != nil {
		errs = append(errs, err.Error())
	}
	if len(errs) > 0 {
		return fmt.Errorf("%s", strings.Join(errs, "; "))
	}
	return nil
}

// CheckImage accepts only what Pull makes: an image ID the user's store
// records for the image's digest, a lease on that record, and the
// entry point the configuration gives the image's role.
func (r *Runtime) CheckImage(img mechanism.Image, _ string) error {
	if img.Format != FormatPodman {
		return fmt.Errorf("unknown image format %q", img.Format)
	}
	if err := kit.CheckShell(img.Shell); err != nil {
		return err
	}
	if len(img.Private) > 0 {
		return fmt.Errorf("image %s carries per-job paths that Pull never sets", img.Handle)
	}
	if !slices.Equal(img.RunOptions, r.entryPoint(false)) && !slices.Equal(img.RunOptions, r.entryPoint(true)) {
		return fmt.Errorf("image %s carries run options %q that the configuration does not give", img.Handle, img.RunOptions)
	}
	if !imageID().MatchString(img.Handle) {
		return fmt.Errorf("image %q is not a Podman image ID", img.Handle)
	}
	if !strings.HasPrefix(img.Digest, "sha256:") || imagecache.CheckKey(storeKey(img.Digest)) != nil {
		return fmt.Errorf("image %s has no valid digest %q", img.Handle, img.Digest)
	}
	st, err := r.Store()
	if err != nil {
		return err
	}
	k := storeKey(img.Digest)
	rec, err := readRecord(st.Path(k))
	if err != nil {
		return fmt.Errorf("image %s: %w", img.Handle, err)
	}
	if rec.ID != img.Handle {
		return fmt.Errorf("image %s is not the one the store records for %s", img.Handle, img.Digest)
	}
	if filepath.Base(filepath.Dir(img.Lease)) != k {
		return fmt.Errorf("the lease %s is not one on %s", img.Lease, k)
	}
	if _, err := containerName(img.Lease); err != nil {
		return err
	}
	return st.CheckLease(img.Lease)
}

// Evict applies the admin's limits to the user's store, then removes the
// evicted records' images from Podman's storage (podman rmi, which leaves
// an image a container still uses), unless a record (or a pull in
// progress) still names them.
func (r *Runtime) Evict(ctx context.Context) ([]imagecache.Evicted, error) {
	st, err := r.Store()
	if err != nil {
		return nil, err
	}
	before := r.records(filepath.Join(st.Root, "entries"))
	evicted, err := r.Base.Evict(ctx)
	if len(evicted) == 0 {
		return evicted, err
	}
	info, perr := r.Probe(ctx)
	if perr != nil {
		return evicted, perr
	}
	unlock, lerr := st.Lock(ctx, imagesLock, "another job of yours is changing your Podman images")
	if lerr != nil {
		return evicted, lerr
	}
	defer unlock()
	kept := r.records(filepath.Join(st.Root, "entries"))
	for id, name := range r.records(filepath.Join(st.Root, "tmp")) {
		kept[id] = name
	}
	for _, e := range evicted {
		for id, key := range before {
			if _, still := kept[id]; key == e.Key && !still {
				_, _ = r.query(ctx, info, "rmi", id)
			}
		}
	}
	return evicted, err
}

// records maps the image IDs named by the records in dir to their file
// names (the store keys, in entries/).
func (r *Runtime) records(dir string) map[string]string {
	out := map[string]string{}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if rec, err := readRecord(filepath.Join(dir, e.Name())); err == nil {
			out[rec.ID] = e.Name()
		}
	}
	return out
}
