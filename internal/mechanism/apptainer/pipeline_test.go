package apptainer

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/testenv"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/joblog"
	"github.com/ci-exec/ci-exec/internal/mechanism"
)

// These tests run Pull and Release against the fake apptainer of
// helpers_test.go and, where a tag must be resolved, a fake registry on
// the loopback interface: no Apptainer, root or network needed.

var (
	digest1 = "sha256:" + strings.Repeat("1", 64)
	digest2 = "sha256:" + strings.Repeat("2", 64)
)

// fakeRegistry answers the manifest HEAD requests of tag resolution over
// plain HTTP, optionally behind basic authentication.
type fakeRegistry struct {
	host string

	mu         sync.Mutex
	tags       map[string]string // "ci/tiny:latest" -> digest
	user, pass string
	heads      int
}

func startRegistry(t *testing.T) *fakeRegistry {
	t.Helper()
	g := &fakeRegistry{tags: map[string]string{"ci/tiny:latest": digest1}}
	srv := httptest.NewServer(g)
	t.Cleanup(srv.Close)
	g.host = strings.TrimPrefix(srv.URL, "http://")
	return g
}

func (g *fakeRegistry) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.user != "" {
		if u, p, ok := r.BasicAuth(); !ok || u != g.user || p != g.pass {
			w.Header().Set("WWW-Authenticate", `Basic realm="fake"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
	}
	if r.URL.Path == "/v2/" {
		return
	}
	repo, tag, ok := strings.Cut(strings.TrimPrefix(r.URL.Path, "/v2/"), "/manifests/")
	if !ok || r.Method != http.MethodHead {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	g.heads++
	d, found := g.tags[repo+":"+tag]
	if !found {
		w.WriteHeader(http.StatusNotFound)
		return
	}
	w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
	w.Header().Set("Content-Length", "321")
	w.Header().Set("Docker-Content-Digest", d)
	w.WriteHeader(http.StatusOK)
}

// set points a tag at a digest.
func (g *fakeRegistry) set(tag, digest string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.tags[tag] = digest
}

// requireLogin makes every request need these basic credentials.
func (g *fakeRegistry) requireLogin(user, pass string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.user, g.pass = user, pass
}

// resolved is how many manifest HEAD requests arrived.
func (g *fakeRegistry) resolved() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.heads
}

// ref is the tiny test image on this registry.
func (g *fakeRegistry) ref(t *testing.T) mechanism.Ref { return parsedRef(t, g.host+"/ci/tiny:latest") }

// closedPort is a loopback address nothing listens on.
func closedPort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	require.NoError(t, l.Close())
	return addr
}

// pullReq is a request for ref by job key. Insecure is set: the fake
// registry speaks plain HTTP, as a listed insecure registry would.
func (f *fakeApptainer) pullReq(ref mechanism.Ref, key, policy string, cred auth.Credential, log io.Writer) mechanism.PullRequest {
	return mechanism.PullRequest{
		Ref: ref, Policy: policy, Credential: cred, Insecure: true, JobKey: key,
		MountPoints: []string{"/builds/ci"}, Dir: f.jobDir, Log: joblog.New(log),
	}
}

func readString(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	return string(b)
}

// assertStoreClean checks that a failed pull left nothing in the store: no
// image, no temporary file, no lease.
func (f *fakeApptainer) assertStoreClean(t *testing.T) {
	t.Helper()
	assert.Empty(t, f.entries(t), "no stored image")
	assert.Empty(t, ls(t, filepath.Join(f.storeRoot(), "tmp")), "no temporary pull file")
	assert.Empty(t, ls(t, filepath.Join(f.storeRoot(), "refs")), "no lease")
}

func TestPullAlways(t *testing.T) {
	t.Setenv("APPTAINER_BIND", "/etc:/mnt")
	t.Setenv("SINGULARITY_BIND", "/etc:/mnt")
	g := startRegistry(t)
	g.requireLogin("alice", alicePass)
	f := installFake(t, config.Mechanism{}, hostileHostEnv)
	ref := g.ref(t)
	cred := aliceFor(t, g.host, alicePass)
	ctx := context.Background()
	var logBuf bytes.Buffer

	img, err := f.rt.Pull(ctx, f.pullReq(ref, jobKey, config.PullAlways, cred, &logBuf))
	require.NoError(t, err)
	assert.Equal(t, 1, g.resolved())
	assert.Equal(t, 1, f.pulls(t))

	// apptainer pulled exactly the resolved digest, into a temporary name
	// in the store, published when complete.
	stored := f.storedSIF(digest1)
	argv := f.lines(t, "pull-argv")
	require.Len(t, argv, 5, argv)
	assert.Equal(t, []string{"pull", "--force", "--no-https"}, argv[:3])
	assert.Equal(t, "docker://"+g.host+"/ci/tiny@"+digest1, argv[4])
	assert.Equal(t, filepath.Join(f.storeRoot(), "tmp"), filepath.Dir(argv[3]))
	assert.True(t, strings.HasPrefix(filepath.Base(argv[3]), sifKey(digest1)+"."), argv[3])
	assert.NoFileExists(t, argv[3])
	assert.Equal(t, []string{sifKey(digest1)}, f.entries(t), "only the stored SIF")
	assert.Empty(t, ls(t, filepath.Join(f.storeRoot(), "tmp")))
	assert.Equal(t, "SIF image with bash\n", sifText(t, stored))
	assert.Equal(t, digest1, f.store(t).Tag(ref.Full))
	assertNoSecret(t, "pull argv", argv...)

	// Credentials and settings only through the environment.
	env := f.recordedEnv(t, "pull-env")
	assert.ElementsMatch(t, f.rt.toolEnv(cred), env)
	assert.Contains(t, env, "APPTAINER_DOCKER_USERNAME=alice")
	assert.Contains(t, env, "APPTAINER_DOCKER_PASSWORD="+alicePass)
	assert.Contains(t, env, "APPTAINER_CACHEDIR="+filepath.Join(f.storage, "cache"))
	assert.Contains(t, env, "APPTAINER_TMPDIR="+filepath.Join(f.storage, "tmp"))
	assert.Contains(t, env, "https_proxy=http://proxy:3128")
	assert.Contains(t, env, "PATH="+f.app+":"+toolPath)
	for _, kv := range env {
		assert.False(t, strings.HasPrefix(kv, "APPTAINER_BIND="), kv)
		assert.False(t, strings.HasPrefix(kv, "SINGULARITY"), kv)
		assert.False(t, strings.HasPrefix(kv, "LD_PRELOAD="), kv)
		assert.NotEqual(t, "APPTAINER_DOCKER_PASSWORD=host-password", kv)
	}
	assert.Equal(t, []string{"/dev/null"}, f.lines(t, "pull-stdin"))

	// The shell was looked for in the stored SIF, without credentials, and
	// recorded with it.
	assert.Equal(t, []string{"exec", "--cleanenv", stored, "/bin/sh", "-c", shellProbe}, f.lines(t, "exec-argv"))
	assert.ElementsMatch(t, []string{"PATH=" + f.app + ":" + toolPath, "HOME=/home/ciuser", "USER=ciuser", "LOGNAME=ciuser", "LANG=C.UTF-8"},
		f.recordedEnv(t, "exec-env"))
	assert.Equal(t, "/bin/bash", f.store(t).Meta(sifKey(digest1), "shell"))

	// The job runs the stored SIF under a lease.
	assert.Positive(t, img.PullTime)
	assert.Positive(t, img.ReadyTime)
	assert.Equal(t, mechanism.Image{Ref: ref.Full, Handle: stored, Format: FormatSIF, Digest: digest1, Shell: "/bin/bash",
		Lease: f.lease(digest1, jobKey), Cache: "miss", PullTime: img.PullTime, ReadyTime: img.ReadyTime}, img)
	assert.FileExists(t, img.Lease)
	assert.Empty(t, ls(t, f.jobDir), "nothing per-job in the scripts dir")
	assert.Contains(t, logBuf.String(), "apptainer pull "+ref.AtDigest(digest1))
	assert.Contains(t, logBuf.String(), "Converting OCI blobs to SIF format")
	assertNoSecret(t, "job log", logBuf.String())

	// Same digest for the next job: resolved again, neither pulled nor run
	// again (the shell is recorded).
	logBuf.Reset()
	img2, err := f.rt.Pull(ctx, f.pullReq(ref, "j43-def", config.PullAlways, cred, &logBuf))
	require.NoError(t, err)
	assert.Equal(t, 2, g.resolved())
	assert.Equal(t, 1, f.pulls(t))
	assert.Equal(t, 1, f.execs(t))
	assert.NotContains(t, logBuf.String(), "apptainer pull")
	assert.Equal(t, mechanism.Image{Ref: ref.Full, Handle: stored, Format: FormatSIF, Digest: digest1, Shell: "/bin/bash",
		Lease: f.lease(digest1, "j43-def"), Cache: "hit", ReadyTime: img2.ReadyTime}, img2)

	// The tag moves: the next job pulls the new image; the first ones keep
	// theirs.
	g.set("ci/tiny:latest", digest2)
	f.setImage(t, "SIF v2 with sh only\n")
	img3, err := f.rt.Pull(ctx, f.pullReq(ref, "j44-ghi", config.PullAlways, cred, io.Discard))
	require.NoError(t, err)
	assert.Equal(t, 2, f.pulls(t))
	assert.Equal(t, digest2, img3.Digest)
	assert.Equal(t, "miss", img3.Cache)
	assert.Equal(t, "/bin/sh", img3.Shell)
	assert.Equal(t, f.storedSIF(digest2), img3.Handle)
	assert.Equal(t, "SIF image with bash\n", sifText(t, stored))
	assert.Equal(t, "SIF v2 with sh only\n", sifText(t, img3.Handle))
	assert.Equal(t, digest2, f.store(t).Tag(ref.Full))
	assert.ElementsMatch(t, []string{sifKey(digest1), sifKey(digest2)}, f.entries(t))

	// Cleanup ends the job's lease only.
	require.NoError(t, f.rt.Release(ctx, img, f.jobDir))
	assert.NoFileExists(t, img.Lease)
	assert.FileExists(t, img2.Lease)
	assert.FileExists(t, img3.Lease)
	assert.FileExists(t, stored)
	require.NoError(t, f.rt.Release(ctx, img, f.jobDir), "cleanup may run twice")
	require.NoError(t, f.rt.Release(ctx, img2, f.jobDir))
	require.NoError(t, f.rt.Release(ctx, img3, f.jobDir))
	assert.Empty(t, ls(t, filepath.Join(f.storeRoot(), "refs")))
	assert.ElementsMatch(t, []string{sifKey(digest1), sifKey(digest2)}, f.entries(t))
}

func TestPullVariants(t *testing.T) {
	t.Run("job token", func(t *testing.T) {
		g := startRegistry(t)
		g.requireLogin(auth.JobTokenUser, tokenValue)
		f := installFake(t, config.Mechanism{}, nil)
		_, err := f.rt.Pull(context.Background(), f.pullReq(g.ref(t), jobKey, config.PullAlways, tokenFor(t, g.host), io.Discard))
		require.NoError(t, err)
		env := f.recordedEnv(t, "pull-env")
		assert.Contains(t, env, "APPTAINER_DOCKER_USERNAME=gitlab-ci-token")
		assert.Contains(t, env, "APPTAINER_DOCKER_PASSWORD="+tokenValue)
		assertNoSecret(t, "pull argv", f.lines(t, "pull-argv")...)
		assertNoSecret(t, "exec env", f.lines(t, "exec-env")...)
	})
	t.Run("anonymous has no credential variables", func(t *testing.T) {
		g := startRegistry(t)
		f := installFake(t, config.Mechanism{}, hostileHostEnv)
		_, err := f.rt.Pull(context.Background(), f.pullReq(g.ref(t), jobKey, config.PullAlways, auth.Credential{}, io.Discard))
		require.NoError(t, err)
		for _, kv := range f.recordedEnv(t, "pull-env") {
			assert.False(t, strings.HasPrefix(kv, "APPTAINER_DOCKER_"), kv)
		}
	})
	t.Run("pinned digest: no registry request, no --no-https unless listed", func(t *testing.T) {
		f := installFake(t, config.Mechanism{}, nil)
		ref := parsedRef(t, closedPort(t)+"/ci/tiny@"+digest1)
		req := f.pullReq(ref, jobKey, config.PullAlways, auth.Credential{}, io.Discard)
		req.Insecure = false
		img, err := f.rt.Pull(context.Background(), req)
		require.NoError(t, err)
		assert.Equal(t, digest1, img.Digest)
		assert.Equal(t, []string{"pull", "--force"}, f.lines(t, "pull-argv")[:2])
		assert.Equal(t, "docker://"+ref.Full, f.lines(t, "pull-argv")[3])
		assert.Equal(t, f.storedSIF(digest1), img.Handle)
	})
	t.Run("single file: the SIF as it is", func(t *testing.T) {
		f := installFake(t, config.Mechanism{}, nil)
		ref := parsedRef(t, closedPort(t)+"/ci/tiny@"+digest1)
		req := f.pullReq(ref, jobKey, config.PullAlways, auth.Credential{}, io.Discard)
		req.SingleFile = true
		img, err := f.rt.Pull(context.Background(), req)
		require.NoError(t, err)
		assert.Equal(t, FormatSIF, img.Format)
		assert.Equal(t, f.storedSIF(digest1), img.Handle)
		assert.Empty(t, img.RunOptions)
		assert.Empty(t, img.Private)
		assert.Zero(t, img.ConvertTime)
		assert.Equal(t, 1, f.pulls(t))
		assert.Equal(t, []string{sifKey(digest1)}, f.entries(t))
	})
	t.Run("cache_dir and tmp_dir", func(t *testing.T) {
		shared := t.TempDir()
		cache, tmp := filepath.Join(shared, "cache"), filepath.Join(shared, "tmp")
		require.NoError(t, os.Mkdir(cache, 0o1777))
		require.NoError(t, os.Mkdir(tmp, 0o1777))
		f := installFake(t, config.Mechanism{CacheDir: cache, TmpDir: tmp}, nil)
		ref := parsedRef(t, "127.0.0.1:5443/ci/tiny@"+digest1)
		_, err := f.rt.Pull(context.Background(), f.pullReq(ref, jobKey, config.PullAlways, auth.Credential{}, io.Discard))
		require.NoError(t, err)
		env := f.recordedEnv(t, "pull-env")
		assert.Contains(t, env, "APPTAINER_CACHEDIR="+filepath.Join(cache, jobUser))
		assert.Contains(t, env, "APPTAINER_TMPDIR="+filepath.Join(tmp, jobUser))
		assert.DirExists(t, filepath.Join(cache, jobUser))
		assert.DirExists(t, filepath.Join(tmp, jobUser))
	})
	t.Run("retried prepare: the same lease", func(t *testing.T) {
		f := installFake(t, config.Mechanism{}, nil)
		ref := parsedRef(t, "127.0.0.1:5443/ci/tiny@"+digest1)
		img1, err := f.rt.Pull(context.Background(), f.pullReq(ref, jobKey, config.PullAlways, auth.Credential{}, io.Discard))
		require.NoError(t, err)
		img2, err := f.rt.Pull(context.Background(), f.pullReq(ref, jobKey, config.PullAlways, auth.Credential{}, io.Discard))
		require.NoError(t, err)
		assert.Equal(t, img1.Lease, img2.Lease)
		assert.Equal(t, 1, f.pulls(t))
		require.NoError(t, f.rt.Release(context.Background(), img2, f.jobDir))
		assert.Empty(t, ls(t, filepath.Join(f.storeRoot(), "refs")))
	})
	t.Run("damaged stored SIF: pulled again", func(t *testing.T) {
		f := installFake(t, config.Mechanism{}, nil)
		ref := parsedRef(t, "127.0.0.1:5443/ci/tiny@"+digest1)
		img, err := f.rt.Pull(context.Background(), f.pullReq(ref, "j1-first", config.PullAlways, auth.Credential{}, io.Discard))
		require.NoError(t, err)
		require.NoError(t, os.Truncate(img.Handle, sifHeaderSize+3))
		img, err = f.rt.Pull(context.Background(), f.pullReq(ref, jobKey, config.PullAlways, auth.Credential{}, io.Discard))
		require.NoError(t, err)
		assert.Equal(t, 2, f.pulls(t))
		assert.Equal(t, "miss", img.Cache)
		assert.Equal(t, "SIF image with bash\n", sifText(t, img.Handle))
	})
}

// TestConcurrentJobsPullOnce: jobs of the same user that need the same
// image at once run apptainer pull once.
func TestConcurrentJobsPullOnce(t *testing.T) {
	g := startRegistry(t)
	f := installFake(t, config.Mechanism{}, nil)
	f.set(t, "pull-sleep", "0.5")
	ref := g.ref(t)
	keys := []string{"j1-a", "j2-b", "j3-c"}
	imgs := make([]mechanism.Image, len(keys))
	errs := make([]error, len(keys))
	var wg sync.WaitGroup
	for i, k := range keys {
		wg.Add(1)
		go func() {
			defer wg.Done()
			imgs[i], errs[i] = f.rt.Pull(context.Background(), f.pullReq(ref, k, config.PullAlways, auth.Credential{}, io.Discard))
		}()
	}
	wg.Wait()
	var caches []string
	for i, k := range keys {
		require.NoError(t, errs[i])
		assert.Equal(t, f.storedSIF(digest1), imgs[i].Handle)
		assert.Equal(t, "/bin/bash", imgs[i].Shell)
		assert.Equal(t, f.lease(digest1, k), imgs[i].Lease)
		caches = append(caches, imgs[i].Cache)
	}
	assert.Equal(t, 1, f.pulls(t))
	assert.ElementsMatch(t, []string{"miss", "hit after waiting (another job built it)", "hit after waiting (another job built it)"}, caches)
}

func TestPullIfNotPresent(t *testing.T) {
	g := startRegistry(t)
	f := installFake(t, config.Mechanism{}, nil)
	ref := g.ref(t)
	ctx := context.Background()

	img, err := f.rt.Pull(ctx, f.pullReq(ref, jobKey, config.PullIfNotPresent, auth.Credential{}, io.Discard))
	require.NoError(t, err)
	assert.Equal(t, 1, g.resolved(), "absent: resolved")
	assert.Equal(t, 1, f.pulls(t), "absent: pulled")
	assert.Equal(t, "miss", img.Cache)

	// The tag moves in the registry; the stored image is used as is.
	g.set("ci/tiny:latest", digest2)
	f.setImage(t, "a newer SIF\n")
	img, err = f.rt.Pull(ctx, f.pullReq(ref, "j43-def", config.PullIfNotPresent, auth.Credential{}, io.Discard))
	require.NoError(t, err)
	assert.Equal(t, 1, g.resolved(), "present: the registry is not asked")
	assert.Equal(t, 1, f.pulls(t), "present: not pulled again")
	assert.Equal(t, "hit", img.Cache)
	assert.Equal(t, f.storedSIF(digest1), img.Handle)
	assert.Equal(t, digest1, img.Digest)
	assert.Equal(t, "SIF image with bash\n", sifText(t, img.Handle))
	assert.Equal(t, "/bin/bash", img.Shell)

	// The recorded SIF is gone (evicted, removed by hand): resolved and
	// pulled anew.
	require.NoError(t, os.Remove(f.storedSIF(digest1)))
	img, err = f.rt.Pull(ctx, f.pullReq(ref, "j44-ghi", config.PullIfNotPresent, auth.Credential{}, io.Discard))
	require.NoError(t, err)
	assert.Equal(t, 2, g.resolved())
	assert.Equal(t, 2, f.pulls(t))
	assert.Equal(t, digest2, img.Digest)
	assert.Equal(t, "a newer SIF\n", sifText(t, img.Handle))
	assert.Equal(t, digest2, f.store(t).Tag(ref.Full))
}

func TestPullNever(t *testing.T) {
	t.Run("absent", func(t *testing.T) {
		g := startRegistry(t)
		f := installFake(t, config.Mechanism{}, nil)
		img, err := f.rt.Pull(context.Background(), f.pullReq(g.ref(t), jobKey, config.PullNever, aliceCred(t), io.Discard))
		require.Error(t, err)
		assert.Equal(t, failure.User, failure.ClassOf(err))
		assert.Contains(t, err.Error(), "not in your image store")
		assert.Contains(t, err.Error(), g.ref(t).Full)
		assert.Empty(t, img.Handle)
		assert.Zero(t, g.resolved(), "never: the registry is not asked")
		assert.Zero(t, f.pulls(t))
		assert.Zero(t, f.execs(t), "nothing run")
		assert.NoFileExists(t, f.tagRecord(g.ref(t)))
		f.assertStoreClean(t)
	})
	t.Run("present", func(t *testing.T) {
		g := startRegistry(t)
		f := installFake(t, config.Mechanism{}, nil)
		_, err := f.rt.Pull(context.Background(), f.pullReq(g.ref(t), "j1-first", config.PullAlways, auth.Credential{}, io.Discard))
		require.NoError(t, err)
		img, err := f.rt.Pull(context.Background(), f.pullReq(g.ref(t), jobKey, config.PullNever, auth.Credential{}, io.Discard))
		require.NoError(t, err)
		assert.Equal(t, 1, g.resolved())
		assert.Equal(t, 1, f.pulls(t))
		assert.Equal(t, digest1, img.Digest)
		assert.Equal(t, "hit", img.Cache)
		assert.Equal(t, f.storedSIF(digest1), img.Handle)
		assert.Equal(t, f.lease(digest1, jobKey), img.Lease)
	})
	t.Run("pinned digest present", func(t *testing.T) {
		f := installFake(t, config.Mechanism{}, nil)
		ref := parsedRef(t, closedPort(t)+"/ci/tiny@"+digest1)
		_, err := f.rt.Pull(context.Background(), f.pullReq(ref, "j1-first", config.PullAlways, auth.Credential{}, io.Discard))
		require.NoError(t, err)
		img, err := f.rt.Pull(context.Background(), f.pullReq(ref, jobKey, config.PullNever, auth.Credential{}, io.Discard))
		require.NoError(t, err)
		assert.Equal(t, 1, f.pulls(t))
		assert.Equal(t, f.storedSIF(digest1), img.Handle)
	})

	refused := []struct {
		name  string
		setup func(t *testing.T, f *fakeApptainer, ref mechanism.Ref)
	}{
		{"pinned digest absent", nil},
		{"tag record without its SIF", func(t *testing.T, f *fakeApptainer, ref mechanism.Ref) {
			require.NoError(t, f.store(t).SetTag(ref.Full, digest1))
		}},
		{"a directory is not an image", func(t *testing.T, f *fakeApptainer, ref mechanism.Ref) {
			require.NoError(t, f.store(t).SetTag(ref.Full, digest1))
			require.NoError(t, os.MkdirAll(f.storedSIF(digest1), 0o700))
		}},
		{"a truncated SIF is not an image", func(t *testing.T, f *fakeApptainer, ref mechanism.Ref) {
			require.NoError(t, f.store(t).SetTag(ref.Full, digest1))
			require.NoError(t, os.WriteFile(f.storedSIF(digest1), sifFile("SIF image with bash\n")[:sifHeaderSize+4], 0o600))
		}},
		{"a tag record that is not a digest", func(t *testing.T, f *fakeApptainer, ref mechanism.Ref) {
			st := f.store(t)
			require.NoError(t, st.SetTag(ref.Full, digest1))
			require.FileExists(t, f.tagRecord(ref), "the test plants the record where the store keeps it")
			require.NoError(t, os.WriteFile(f.tagRecord(ref), []byte("sha256:../../../etc/passwd\n"), 0o600))
			require.Empty(t, st.Tag(ref.Full))
		}},
	}
	for _, tt := range refused {
		t.Run(tt.name, func(t *testing.T) {
			f := installFake(t, config.Mechanism{}, nil)
			ref := parsedRef(t, "127.0.0.1:5443/ci/tiny:latest")
			if tt.setup == nil {
				ref = parsedRef(t, "127.0.0.1:5443/ci/tiny@"+digest1)
			} else {
				tt.setup(t, f, ref)
			}
			_, err := f.rt.Pull(context.Background(), f.pullReq(ref, jobKey, config.PullNever, auth.Credential{}, io.Discard))
			require.Error(t, err)
			assert.Equal(t, failure.User, failure.ClassOf(err), err.Error())
			assert.Contains(t, err.Error(), "not in your image store")
			assert.Zero(t, f.pulls(t))
			assert.Zero(t, f.execs(t))
			assert.Empty(t, ls(t, filepath.Join(f.storeRoot(), "refs")), "no lease")
		})
	}
}

// TestPullResolveFailures: a tag that cannot be resolved stops the pull
// before apptainer runs, with the same classes as a failed pull.
func TestPullResolveFailures(t *testing.T) {
	tests := []struct {
		name    string
		login   bool // the registry wants alice's password
		cred    func(t *testing.T, host string) auth.Credential
		tag     string
		plain   bool // the registry is not listed as insecure
		down    bool
		class   failure.Class
		wantErr string
	}{
		{name: "anonymous, login needed", login: true, cred: func(*testing.T, string) auth.Credential { return auth.Credential{} },
			class: failure.User, wantErr: "set APPTAINER_DOCKER_USERNAME and APPTAINER_DOCKER_PASSWORD"},
		{name: "wrong password", login: true, cred: func(t *testing.T, h string) auth.Credential { return aliceFor(t, h, "wrong-password-1") },
			class: failure.User, wantErr: "refused the credentials in APPTAINER_DOCKER_USERNAME/APPTAINER_DOCKER_PASSWORD"},
		{name: "job token refused", login: true, cred: tokenFor, class: failure.System, wantErr: "job token"},
		{name: "unknown tag", cred: func(t *testing.T, h string) auth.Credential { return aliceFor(t, h, alicePass) }, tag: "nope",
			class: failure.User, wantErr: "image not found"},
		{name: "plain HTTP, not listed", cred: func(*testing.T, string) auth.Credential { return auth.Credential{} }, plain: true,
			class: failure.System, wantErr: "insecure_registries"},
		{name: "registry down", cred: func(*testing.T, string) auth.Credential { return auth.Credential{} }, down: true,
			class: failure.System, wantErr: "unreachable"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := startRegistry(t)
			if tt.login {
				g.requireLogin("alice", alicePass)
			}
			host := g.host
			if tt.down {
				host = closedPort(t)
			}
			tag := "latest"
			if tt.tag != "" {
				tag = tt.tag
			}
			f := installFake(t, config.Mechanism{}, nil)
			ref := parsedRef(t, host+"/ci/tiny:"+tag)
			req := f.pullReq(ref, jobKey, config.PullAlways, tt.cred(t, host), io.Discard)
			req.Insecure = !tt.plain
			_, err := f.rt.Pull(context.Background(), req)
			require.Error(t, err)
			assert.Equal(t, tt.class, failure.ClassOf(err), err.Error())
			assert.Contains(t, err.Error(), tt.wantErr)
			assert.Contains(t, err.Error(), ref.Full)
			assertNoSecret(t, "error", err.Error())
			assert.NotContains(t, err.Error(), "wrong-password-1")
			assert.Zero(t, f.pulls(t), "apptainer pull not run")
			assert.NoFileExists(t, f.tagRecord(ref))
			f.assertStoreClean(t)
		})
	}
}

// TestPullFailures: apptainer itself fails. The references are pinned, so
// no registry is involved.
func TestPullFailures(t *testing.T) {
	tests := []struct {
		name    string
		setup   func(t *testing.T, f *fakeApptainer)
		cred    func(*testing.T) auth.Credential
		class   failure.Class
		wantErr string
		stored  bool // the stored SIF exists afterwards
	}{
		{"registry refuses user credentials", func(t *testing.T, f *fakeApptainer) { f.set(t, "pull-fail", tailAuth) },
			aliceCred, failure.User, "APPTAINER_DOCKER_USERNAME/APPTAINER_DOCKER_PASSWORD", false},
		{"registry refuses the job token", func(t *testing.T, f *fakeApptainer) { f.set(t, "pull-fail", tailAuth) },
			tokenCred, failure.System, "job token", false},
		{"image not found", func(t *testing.T, f *fakeApptainer) { f.set(t, "pull-fail", tailManifest) },
			anonymous, failure.User, "image not found", false},
		{"plain HTTP", func(t *testing.T, f *fakeApptainer) { f.set(t, "pull-fail", tailPlainHTTP) },
			anonymous, failure.System, "insecure_registries", false},
		{"registry down", func(t *testing.T, f *fakeApptainer) { f.set(t, "pull-fail", tailRefused) },
			aliceCred, failure.System, "connection refused", false},
		{"exit 0 without a SIF", func(t *testing.T, f *fakeApptainer) { f.set(t, "pull-nowrite", "") },
			anonymous, failure.System, "not valid", false},
		{"exit 0 with a truncated SIF", func(t *testing.T, f *fakeApptainer) {
			f.set(t, "image", string(sifFile("SIF image with bash\n")[:sifHeaderSize+5]))
		}, anonymous, failure.System, "truncated SIF file", false},
		{"exit 0 with something else", func(t *testing.T, f *fakeApptainer) {
			f.set(t, "image", strings.Repeat("<html>not found</html>\n", 10))
		}, anonymous, failure.System, "not a SIF file", false},
		{"image without /bin/sh", func(t *testing.T, f *fakeApptainer) { f.setImage(t, "nosh\n") },
			aliceCred, failure.User, "has no /bin/sh", true},
		{"image that apptainer cannot run", func(t *testing.T, f *fakeApptainer) {
			f.set(t, "exec-fail", "FATAL:   container creation failed: failed to mount squashfs filesystem: input/output error\n")
		}, anonymous, failure.System, "failed to mount squashfs filesystem", true},
		{"storage is a symlink", func(t *testing.T, f *fakeApptainer) {
			elsewhere := filepath.Join(filepath.Dir(f.app), "elsewhere")
			require.NoError(t, os.Mkdir(elsewhere, 0o700))
			require.NoError(t, os.Symlink(elsewhere, f.storage))
		}, anonymous, failure.System, "symlink", false},
		{"store is a symlink", func(t *testing.T, f *fakeApptainer) {
			elsewhere := filepath.Join(filepath.Dir(f.app), "elsewhere")
			require.NoError(t, os.Mkdir(elsewhere, 0o700))
			require.NoError(t, os.Symlink(elsewhere, filepath.Dir(f.storeRoot())))
		}, anonymous, failure.System, "symlink", false},
		{"no apptainer", func(t *testing.T, f *fakeApptainer) {
			require.NoError(t, os.Remove(filepath.Join(f.app, "apptainer")))
		}, anonymous, failure.System, "apptainer not found", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := installFake(t, config.Mechanism{}, nil)
			tt.setup(t, f)
			var logBuf bytes.Buffer
			ref := parsedRef(t, regHost+"/ci/tiny@"+digest1)
			_, err := f.rt.Pull(context.Background(), f.pullReq(ref, jobKey, config.PullAlways, tt.cred(t), &logBuf))
			require.Error(t, err)
			assert.Equal(t, tt.class, failure.ClassOf(err), err.Error())
			assert.Contains(t, err.Error(), tt.wantErr)
			assertNoSecret(t, "error", err.Error())
			assertNoSecret(t, "job log", logBuf.String())
			assert.Empty(t, ls(t, f.jobDir), "nothing left in the job dir")
			assert.Empty(t, ls(t, filepath.Join(f.storeRoot(), "refs")), "no lease left")
			assert.Empty(t, ls(t, filepath.Join(f.storeRoot(), "tmp")), "no temporary pull file left")
			if tt.stored {
				assert.Equal(t, []string{sifKey(digest1)}, f.entries(t))
				assert.Empty(t, f.store(t).Meta(sifKey(digest1), "shell"), "no shell recorded")
			} else {
				assert.Empty(t, ls(t, filepath.Join(f.storeRoot(), "entries")), "nothing stored")
				assert.NoFileExists(t, f.tagRecord(ref), "no tag record for a failed pull")
			}
		})
	}
}

// TestFailedPullKeepsTheStoredImage: when the tag moved and pulling the new
// digest fails, the image stored before and the tag record stay as they
// were, so if-not-present jobs keep working.
func TestFailedPullKeepsTheStoredImage(t *testing.T) {
	g := startRegistry(t)
	f := installFake(t, config.Mechanism{}, nil)
	ref := g.ref(t)
	ctx := context.Background()
	_, err := f.rt.Pull(ctx, f.pullReq(ref, "j1-first", config.PullAlways, auth.Credential{}, io.Discard))
	require.NoError(t, err)

	g.set("ci/tiny:latest", digest2)
	f.set(t, "pull-fail", tailRefused)
	_, err = f.rt.Pull(ctx, f.pullReq(ref, jobKey, config.PullAlways, auth.Credential{}, io.Discard))
	require.Error(t, err)
	assert.Equal(t, []string{sifKey(digest1)}, f.entries(t))
	assert.Equal(t, "SIF image with bash\n", sifText(t, f.storedSIF(digest1)))
	assert.Equal(t, digest1, f.store(t).Tag(ref.Full))
	assert.NoFileExists(t, f.lease(digest2, jobKey))

	img, err := f.rt.Pull(ctx, f.pullReq(ref, jobKey, config.PullIfNotPresent, auth.Credential{}, io.Discard))
	require.NoError(t, err)
	assert.Equal(t, digest1, img.Digest)
}

func modeOf(t *testing.T, path string) os.FileMode {
	t.Helper()
	fi, err := os.Lstat(path)
	require.NoError(t, err)
	require.True(t, fi.IsDir(), path)
	return fi.Mode().Perm()
}

func TestPrepareDirs(t *testing.T) {
	t.Run("default: all inside the storage, 0700", func(t *testing.T) {
		root := t.TempDir()
		r := runtimeFor(config.Mechanism{ImageStorageDir: root}, nil)
		require.NoError(t, r.prepareDirs())
		for _, d := range []string{r.Storage, r.cacheDir(), r.tmpDir()} {
			assert.Equal(t, os.FileMode(0o700), modeOf(t, d), d)
		}
		assert.Equal(t, filepath.Join(root, "ciuser.apptainer", "cache"), r.cacheDir())
		assert.Equal(t, filepath.Join(root, "ciuser.apptainer", "tmp"), r.tmpDir())
		require.NoError(t, r.prepareDirs(), "again: the dirs exist and are the user's")
	})
	t.Run("cache_dir and tmp_dir get a 0700 dir per user", func(t *testing.T) {
		root, shared := t.TempDir(), t.TempDir()
		cache, tmp := filepath.Join(shared, "cache"), filepath.Join(shared, "tmp")
		for _, d := range []string{cache, tmp} {
			require.NoError(t, os.Mkdir(d, 0o755))
			require.NoError(t, os.Chmod(d, 0o1777))
		}
		r := runtimeFor(config.Mechanism{ImageStorageDir: root, CacheDir: cache, TmpDir: tmp}, nil)
		require.NoError(t, r.prepareDirs())
		assert.Equal(t, os.FileMode(0o700), modeOf(t, filepath.Join(cache, jobUser)))
		assert.Equal(t, os.FileMode(0o700), modeOf(t, filepath.Join(tmp, jobUser)))
		assert.NoDirExists(t, filepath.Join(r.Storage, "cache"))
		assert.NoDirExists(t, filepath.Join(r.Storage, "tmp"))
		require.NoError(t, r.prepareDirs())
	})

	tests := []struct {
		name    string
		setup   func(t *testing.T, root, shared string) config.Mechanism
		wantErr []string
		spared  string // a directory that must stay empty
	}{
		{"storage is a symlink", func(t *testing.T, root, shared string) config.Mechanism {
			require.NoError(t, os.Symlink(shared, filepath.Join(root, "ciuser.apptainer")))
			return config.Mechanism{ImageStorageDir: root}
		}, []string{"image storage", "symlink"}, "shared"},
		{"storage is a file", func(t *testing.T, root, _ string) config.Mechanism {
			require.NoError(t, os.WriteFile(filepath.Join(root, "ciuser.apptainer"), nil, 0o600))
			return config.Mechanism{ImageStorageDir: root}
		}, []string{"image storage", "not a directory"}, ""},
		{"image_storage_dir missing", func(t *testing.T, root, _ string) config.Mechanism {
			return config.Mechanism{ImageStorageDir: filepath.Join(root, "missing")}
		}, []string{"image storage", "does not exist"}, ""},
		{"per-user cache dir is a symlink", func(t *testing.T, root, shared string) config.Mechanism {
			cache := filepath.Join(root, "cache")
			require.NoError(t, os.Mkdir(cache, 0o755))
			require.NoError(t, os.Symlink(shared, filepath.Join(cache, jobUser)))
			return config.Mechanism{ImageStorageDir: root, CacheDir: cache}
		}, []string{"general.apptainer.cache_dir", "symlink"}, "shared"},
		{"cache_dir missing", func(t *testing.T, root, _ string) config.Mechanism {
			return config.Mechanism{ImageStorageDir: root, CacheDir: filepath.Join(root, "no-cache")}
		}, []string{"general.apptainer.cache_dir", "does not exist"}, ""},
		{"per-user tmp dir is a symlink", func(t *testing.T, root, shared string) config.Mechanism {
			tmp := filepath.Join(root, "tmp")
			require.NoError(t, os.Mkdir(tmp, 0o755))
			require.NoError(t, os.Symlink(shared, filepath.Join(tmp, jobUser)))
			return config.Mechanism{ImageStorageDir: root, TmpDir: tmp}
		}, []string{"general.apptainer.tmp_dir", "symlink"}, "shared"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			shared := filepath.Join(t.TempDir(), "shared")
			require.NoError(t, os.Mkdir(shared, 0o777))
			r := runtimeFor(tt.setup(t, root, shared), nil)
			err := r.prepareDirs()
			require.Error(t, err)
			for _, s := range tt.wantErr {
				assert.Contains(t, err.Error(), s)
			}
			if tt.spared != "" {
				entries, err := os.ReadDir(shared)
				require.NoError(t, err)
				assert.Empty(t, entries, "nothing created through the symlink")
			}
		})
	}

	t.Run("per-user cache dir of another user", func(t *testing.T) {
		testenv.RequireRoot(t)
		root := t.TempDir()
		cache := filepath.Join(root, "cache")
		planted := filepath.Join(cache, jobUser)
		require.NoError(t, os.MkdirAll(planted, 0o777))
		require.NoError(t, os.Chown(planted, 65534, 65534))
		r := runtimeFor(config.Mechanism{ImageStorageDir: root, CacheDir: cache}, nil)
		err := r.prepareDirs()
		require.Error(t, err)
		assert.Contains(t, err.Error(), "belongs to uid 65534")
		fi, err := os.Lstat(planted)
		require.NoError(t, err)
		assert.Equal(t, uint32(65534), fi.Sys().(*syscall.Stat_t).Uid)
	})
}
