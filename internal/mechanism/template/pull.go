package template

import (
	"context"
	"fmt"
	"io"
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

// Image formats: a file pull wrote ({image_file}), or a record naming the
// image in the runtime's own storage.
const (
	FormatFile      = "template-file"
	FormatReference = "template-ref"
)

// imagesLock serialises what changes the set of images in the runtime's
// storage (a pull and its record; remove), so that an eviction never
// removes an image a pull has just recorded.
const imagesLock = "template-images"

// fileMode says whether pull writes the image as a file.
func (r *Runtime) fileMode() bool {
	for _, w := range r.t.Pull {
		if strings.Contains(w, "{image_file}") {
			return true
		}
	}
	return false
}

func storeKey(digest string, file bool) string {
	k := strings.ReplaceAll(digest, ":", "-")
	if file {
		return k + ".image"
	}
	return k + ".ref"
}

// Pull makes the image available: the digest is resolved by the pull
// policy (kit.ResolveDigest), the store's entry for it is checked (check,
// when the template has one, asks the runtime whether it still has a
// recorded image) or made once across concurrent jobs (pull), the job
// takes a lease on it, and setup runs for the job.
func (r *Runtime) Pull(ctx context.Context, req mechanism.PullRequest) (mechanism.Image, error) {
	start := time.Now()
	ctx = kit.StoreTrace(ctx, req.Log)
	file := r.fileMode()
	img := mechanism.Image{Ref: req.Ref.Full, Format: FormatReference, Shell: r.shell()}
	if file {
		img.Format = FormatFile
	}
	info, err := r.Probe(ctx)
	if err != nil {
		return img, err
	}
	if err := r.prepareDirs(); err != nil {
		return img, failure.Systemf("%s: %v", r.Name(), err)
	}
	st, err := r.Store()
	if err != nil {
		return img, failure.Systemf("%s: %v", r.Name(), err)
	}
	img.Digest, err = kit.ResolveDigest(ctx, st, req, r.CredentialVariables(), registry.Options{PlainHTTP: req.Insecure},
		func(d string) bool { return r.valid(ctx, info, req, d, st.Path(storeKey(d, file))) == nil })
	if err != nil {
		return img, err
	}
	k := storeKey(img.Digest, file)
	res, err := st.Ensure(ctx, k, req.JobKey, func(p string) error { return r.valid(ctx, info, req, img.Digest, p) },
		func(ctx context.Context, tmp string) error {
			t := time.Now()
			defer func() { img.PullTime = time.Since(t) }()
			return r.fetch(ctx, info, st, req, img.Digest, tmp)
		})
	if err != nil {
		return img, kit.StoreError(err)
	}
	kit.LogDamaged(req.Log, res)
	img.Cache = kit.CacheState(res)
	if err := st.SetTag(req.Ref.Full, img.Digest); err != nil {
		req.Log.Warnf("could not record the digest of %s: %v", req.Ref.Full, err)
	}
	img.Lease = res.Lease
	if img.Handle, err = r.handle(res.Path, file); err != nil {
		_ = st.Release(res.Lease)
		return img, failure.Systemf("%s: %v", r.Name(), err)
	}
	if len(r.t.FindShell) > 0 {
		if img.Shell = st.Meta(k, "shell"); kit.CheckShell(img.Shell) != nil {
			if img.Shell, err = r.findShell(ctx, info, img, req); err != nil {
				_ = r.Release(ctx, img, req.Dir)
				return img, err
			}
			_ = st.SetMeta(k, "shell", img.Shell)
		}
	}
	if len(r.t.Setup) > 0 {
		if err := r.action(ctx, info, "setup", r.t.Setup, img, req.Dir, req.Log.Writer()); err != nil {
			_ = r.Release(ctx, img, req.Dir)
			return img, failure.Systemf("%s: %v", r.Name(), err)
		}
	}
	img.ReadyTime = time.Since(start)
	return img, nil
}

// handle is what {image} names: the entry file itself, or the reference
// the record holds.
func (r *Runtime) handle(path string, file bool) (string, error) {
	if file {
		return path, nil
	}
	return readRecord(path)
}

var recordRE = sync.OnceValue(func() *regexp.Regexp {
	return regexp.MustCompile(`^[a-z0-9][a-z0-9._:/-]*@sha256:[0-9a-f]{64}$`)
})

func readRecord(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	ref := strings.TrimSuffix(string(b), "\n")
	if !recordRE().MatchString(ref) {
		return "", fmt.Errorf("%s is not an image record", path)
	}
	return ref, nil
}

// valid checks a store entry: a record must name the digest (and, with a
// check action, the runtime must still have the image); a file must be
// one (check may look at it).
func (r *Runtime) valid(ctx context.Context, info mechanism.Info, req mechanism.PullRequest, digest, path string) error {
	img := mechanism.Image{Ref: req.Ref.Full, Digest: digest}
	if r.fileMode() {
		fi, err := os.Stat(path)
		if err != nil || !fi.Mode().IsRegular() && !fi.IsDir() {
			return fmt.Errorf("%s is not an image", path)
		}
		img.Handle = path
	} else {
		ref, err := readRecord(path)
		if err != nil {
			return err
		}
		if !strings.HasSuffix(ref, "@"+digest) {
			return fmt.Errorf("%s records %s, not digest %s", path, ref, digest)
		}
		img.Handle = ref
	}
	if len(r.t.Check) == 0 {
		return nil
	}
	return r.check(ctx, info, req, img)
}

// check runs the check action: exit code 0 means the runtime has the
// image.
func (r *Runtime) check(ctx context.Context, info mechanism.Info, req mechanism.PullRequest, img mechanism.Image) error {
	v := values{scalars: r.scalars(img, req.JobKey), lists: map[string][]string{
		"auth": nil, "insecure": r.insecure(req), "rootless": r.rootless()}}
	argv, err := r.argv(info, r.t.Check, v)
	if err != nil {
		return err
	}
	env, err := r.baseEnv()
	if err != nil {
		return err
	}
	var out strings.Builder
	res, err := kit.RunTool(ctx, kit.Tool{Argv: argv, Env: env, Dir: req.Dir, Output: &out, Grace: r.Grace})
	if err != nil {
		return err
	}
	if res.ExitCode != 0 {
		return fmt.Errorf("check of %s: exit code %d: %s", img.Handle, res.ExitCode, kit.LastLine(res.Tail))
	}
	return nil
}

func (r *Runtime) insecure(req mechanism.PullRequest) []string {
	if req.Insecure {
		return r.t.Insecure
	}
	return nil
}

// scalars are the common and image scalars of img.
func (r *Runtime) scalars(img mechanism.Image, jobKey string) map[string]string {
	s := r.common()
	for k, v := range imageScalars(img.Ref, img.Digest, img.Handle, jobKey) {
		s[k] = v
	}
	return s
}

// fetch makes the store entry at tmp (Ensure publishes it): pull writes
// the image file there, or pulls into the runtime's storage and ci-exec
// writes the record. A check-only template (images the site provides)
// records the image when check finds it.
func (r *Runtime) fetch(ctx context.Context, info mechanism.Info, st *imagecache.Store, req mechanism.PullRequest, digest, tmp string) error {
	unlock, err := st.Lock(ctx, imagesLock, "another job of yours is changing your "+r.Name()+" images")
	if err != nil {
		return err
	}
	defer unlock()
	file := r.fileMode()
	img := mechanism.Image{Ref: req.Ref.Full, Digest: digest}
	ref := req.Ref.AtDigest(digest)
	if !file {
		img.Handle = ref
	}
	if len(r.t.Pull) == 0 {
		if err := r.check(ctx, info, req, img); err != nil {
			return failure.Userf("image %s is not provided on this host (%v); use an image the site provides, or ask the admin", req.Ref.Full, err)
		}
		return os.WriteFile(tmp, []byte(ref+"\n"), 0o600)
	}
	if !req.Credential.Anonymous() && len(r.t.Auth) == 0 && r.t.UsernameEnv == "" {
		req.Log.Warnf("%s passes no registry credentials (runtimes.%s has no auth fragment or username_env): pulling %s anonymously", r.Name(), r.name, req.Ref.Full)
	}
	authFile, err := r.writeAuthFile(req)
	if err != nil {
		return failure.Systemf("%s: write the registry credentials for %s: %v", r.Name(), req.Ref.Full, err)
	}
	if authFile != "" {
		defer os.Remove(authFile)
	}
	s := r.scalars(img, req.JobKey)
	if file {
		s["image_file"], s["image"] = tmp, tmp
	}
	var authWords []string
	if authFile != "" {
		if authWords, err = fragment(r.t.Auth, r.common(), []map[string]string{{"authfile": authFile}}); err != nil {
			return failure.Systemf("%s: auth: %v", r.Name(), err)
		}
	}
	argv, err := r.argv(info, r.t.Pull, values{scalars: s, lists: map[string][]string{
		"auth": authWords, "insecure": r.insecure(req), "rootless": r.rootless()}})
	if err != nil {
		return failure.Systemf("%s: pull: %v", r.Name(), err)
	}
	settings, err := r.commandEnv()
	if err != nil {
		return failure.Systemf("%s: %v", r.Name(), err)
	}
	// The network settings of the driver's environment, and the credential
	// under the admin's variable names (username_env), only here.
	var names auth.VariableNames
	cred := req.Credential
	if r.t.UsernameEnv != "" {
		names = auth.VariableNames{Username: r.t.UsernameEnv, Password: r.t.PasswordEnv}
	} else {
		cred = auth.Credential{}
	}
	env := kit.ToolEnv(r.User, r.ToolPath(kit.SystemPath), settings, r.HostEnv, req.Insecure, cred, names)
	end := req.Log.Section("template_pull", r.Name()+" pull "+ref, false)
	w := req.Log.Writer()
	res, err := kit.RunTool(ctx, kit.Tool{Argv: argv, Env: env, Dir: req.Dir, Output: w, Grace: r.Grace})
	w.Close()
	end()
	if err != nil {
		return failure.Systemf("%s: pull %s: %v", r.Name(), req.Ref.Full, err)
	}
	if res.ExitCode != 0 {
		return classifyPull(req.Ref.Full, req.Credential, r.CredentialVariables(), res.Tail, r.Storage, r.t.ErrorPrefix)
	}
	if file {
		if _, err := os.Stat(tmp); err != nil {
			return failure.Systemf("%s: pull of %s exited 0 but wrote no {image_file}", r.Name(), req.Ref.Full)
		}
		return nil
	}
	return os.WriteFile(tmp, []byte(ref+"\n"), 0o600)
}

// authFileName is the per-job credential file in the job's state dir.
func authFileName(dir, jobKey string) string {
	return filepath.Join(dir, "template-auth-"+jobKey+".json")
}

// writeAuthFile writes the pull's credential, 0600, in the job's state
// dir, when the template has an auth fragment and the pull is not
// anonymous ("" otherwise).
func (r *Runtime) writeAuthFile(req mechanism.PullRequest) (string, error) {
	if len(r.t.Auth) == 0 {
		return "", nil
	}
	return kit.WriteAuthFile(authFileName(req.Dir, req.JobKey), req)
}

// classifyPull reads a failed pull's output with the messages container
// tools built on containers/image and the Docker registry API print; the
// class and the advice are the shared ones (kit.PullError).
func classifyPull(ref string, cred auth.Credential, names auth.VariableNames, tail, storage, prefix string) error {
	last := ""
	if prefix != "" {
		last = kit.LastLine(tail, prefix)
	}
	if last == "" {
		last = kit.LastLine(tail)
	}
	kind, last := kit.GoPullFailure("", last, tail)
	return kit.PullError(kind, ref, cred, names, storage, last)
}

// action runs setup or teardown for img.
func (r *Runtime) action(ctx context.Context, info mechanism.Info, name string, tmpl []string, img mechanism.Image, dir string, out io.WriteCloser) error {
	defer out.Close()
	key, err := jobKeyOf(img.Lease)
	if err != nil {
		return err
	}
	argv, err := r.argv(info, tmpl, values{scalars: r.scalars(img, key), lists: map[string][]string{"rootless": r.rootless()}})
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	env, err := r.baseEnv()
	if err != nil {
		return err
	}
	res, err := kit.RunTool(ctx, kit.Tool{Argv: argv, Env: env, Dir: dir, Output: out, Grace: r.Grace})
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	if res.ExitCode != 0 {
		return fmt.Errorf("%s exited with %d: %s", name, res.ExitCode, kit.LastLine(res.Tail))
	}
	return nil
}

// prepareDirs makes the user's storage, run dir and tmp dir (0700, the
// user's own); the template's own dirs under them are the runtime's
// business.
func (r *Runtime) prepareDirs() error {
	if err := kit.EnsureUserDir(r.Storage); err != nil {
		return fmt.Errorf("image storage: %w", err)
	}
	if err := kit.EnsureUserDir(r.runDir()); err != nil {
		return fmt.Errorf("run dir: %w", err)
	}
	if r.Cfg.TmpDir == "" {
		return os.MkdirAll(r.tmpDir(), 0o700)
	}
	if err := kit.EnsureUserDir(r.tmpDir()); err != nil {
		return fmt.Errorf("runtimes.%s.tmp_dir: %w", r.name, err)
	}
	return nil
}

// discard is a WriteCloser that drops output (teardown at cleanup).
type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }
func (discard) Close() error                { return nil }

// Release runs teardown for the job's image (a stage that was killed
// leaves what it started; teardown removes it), removes the job's
// credential file, and ends its lease.
func (r *Runtime) Release(ctx context.Context, img mechanism.Image, jobDir string) error {
	var errs []string
	if key, err := jobKeyOf(img.Lease); err == nil {
		_ = os.Remove(authFileName(jobDir, key))
		if len(r.t.Teardown) > 0 {
			info, err := r.Probe(ctx)
			if err == nil {
				err = r.action(ctx, info, "teardown", r.t.Teardown, img, jobDir, discard{})
			}
			if err != nil {
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

// CheckImage accepts only what Pull makes: an entry of the user's store
// for the image's digest (the file, or the record's reference), and a
// lease on it.
func (r *Runtime) CheckImage(img mechanism.Image, _ string) error {
	file := r.fileMode()
	switch {
	case file && img.Format != FormatFile, !file && img.Format != FormatReference:
		return fmt.Errorf("image format %q is not what %s makes", img.Format, r.Name())
	case len(r.t.FindShell) == 0 && img.Shell != r.shell():
		return fmt.Errorf("image %s has shell %q, not the configured %q", img.Handle, img.Shell, r.shell())
	case kit.CheckShell(img.Shell) != nil:
		return kit.CheckShell(img.Shell)
	case len(img.Private) > 0 || len(img.RunOptions) > 0:
		return fmt.Errorf("image %s carries per-job paths or run options that Pull never sets", img.Handle)
	case !strings.HasPrefix(img.Digest, "sha256:") || imagecache.CheckKey(storeKey(img.Digest, file)) != nil:
		return fmt.Errorf("image %s has no valid digest %q", img.Handle, img.Digest)
	}
	st, err := r.Store()
	if err != nil {
		return err
	}
	k := storeKey(img.Digest, file)
	want, err := r.handle(st.Path(k), file)
	if err != nil {
		return fmt.Errorf("image %s: %w", img.Handle, err)
	}
	if want != img.Handle {
		return fmt.Errorf("image %s is not the one the store has for %s", img.Handle, img.Digest)
	}
	if filepath.Base(filepath.Dir(img.Lease)) != k {
		return fmt.Errorf("the lease %s is not one on %s", img.Lease, k)
	}
	if _, err := jobKeyOf(img.Lease); err != nil {
		return err
	}
	return st.CheckLease(img.Lease)
}

// Evict applies the admin's limits to the user's store, then runs remove
// for each evicted record whose image no other record (or a pull in
// progress) names. An evicted image file is gone with its entry; remove
// runs for it too, for what the runtime keeps beside it.
func (r *Runtime) Evict(ctx context.Context) ([]imagecache.Evicted, error) {
	st, err := r.Store()
	if err != nil {
		return nil, err
	}
	file := r.fileMode()
	before := r.records(filepath.Join(st.Root, "entries"))
	evicted, err := r.Base.Evict(ctx)
	if len(evicted) == 0 || len(r.t.Remove) == 0 {
		return evicted, err
	}
	info, perr := r.Probe(ctx)
	if perr != nil {
		return evicted, perr
	}
	unlock, lerr := st.Lock(ctx, imagesLock, "another job of yours is changing your "+r.Name()+" images")
	if lerr != nil {
		return evicted, lerr
	}
	defer unlock()
	kept := map[string]bool{}
	for _, dir := range []string{"entries", "tmp"} {
		for _, ref := range r.records(filepath.Join(st.Root, dir)) {
			kept[ref] = true
		}
	}
	env, eerr := r.baseEnv()
	if eerr != nil {
		return evicted, eerr
	}
	for _, e := range evicted {
		handle := before[e.Key]
		if file {
			handle = st.Path(e.Key)
		}
		if handle == "" || kept[handle] {
			continue
		}
		digest := "sha256:" + strings.TrimPrefix(strings.TrimSuffix(strings.TrimSuffix(e.Key, ".ref"), ".image"), "sha256-")
		s := r.common()
		s["image"], s["digest"] = handle, digest
		s["ref"] = handle
		if ref, _, ok := strings.Cut(handle, "@"); ok && !file {
			s["registry"], s["repository"], _ = strings.Cut(ref, "/")
		}
		argv, aerr := r.argv(info, r.t.Remove, values{scalars: s, lists: map[string][]string{"rootless": r.rootless()}})
		if aerr != nil {
			continue
		}
		_, _ = kit.RunTool(ctx, kit.Tool{Argv: argv, Env: env, Dir: r.Storage, Output: discard{}, Grace: r.Grace})
	}
	return evicted, err
}

// records maps the store keys in dir to the references their records
// hold.
func (r *Runtime) records(dir string) map[string]string {
	out := map[string]string{}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if ref, err := readRecord(filepath.Join(dir, e.Name())); err == nil {
			out[e.Name()] = ref
		}
	}
	return out
}

// findShell runs find_shell once per digest: {probe} is /bin/sh running
// kit.ShellProbe; the last line of its output that is a known shell wins.
func (r *Runtime) findShell(ctx context.Context, info mechanism.Info, img mechanism.Image, req mechanism.PullRequest) (string, error) {
	key, err := jobKeyOf(img.Lease)
	if err != nil {
		return "", failure.Systemf("%s: %v", r.Name(), err)
	}
	argv, err := r.argv(info, r.t.FindShell, values{scalars: r.scalars(img, key), lists: map[string][]string{
		"probe": {"/bin/sh", "-c", kit.ShellProbe}, "rootless": r.rootless()}})
	if err != nil {
		return "", failure.Systemf("%s: find_shell: %v", r.Name(), err)
	}
	env, err := r.baseEnv()
	if err != nil {
		return "", failure.Systemf("%s: %v", r.Name(), err)
	}
	var out strings.Builder
	res, err := kit.RunTool(ctx, kit.Tool{Argv: argv, Env: env, Dir: req.Dir, Output: &out, Grace: r.Grace})
	if err != nil {
		return "", failure.Systemf("%s: find_shell for %s: %v", r.Name(), req.Ref.Full, err)
	}
	if shell := kit.LastLine(out.String(), "/"); res.ExitCode == 0 && kit.CheckShell(shell) == nil {
		return shell, nil
	}
	line := ""
	if r.t.ErrorPrefix != "" {
		line = kit.LastLine(res.Tail, r.t.ErrorPrefix)
	}
	if err := kit.MissingSh(req.Ref.Full, line); err != nil {
		return "", err
	}
	if line == "" {
		line = kit.LastLine(res.Tail)
	}
	return "", failure.Systemf("%s could not run image %s to find its shell (exit code %d): %s", r.Name(), req.Ref.Full, res.ExitCode, line)
}
