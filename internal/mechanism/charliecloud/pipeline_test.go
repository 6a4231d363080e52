package charliecloud

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/joblog"
	"github.com/ci-exec/ci-exec/internal/mechanism"
)

// These tests run Pull, Command and Release against shell-script stand-ins
// for ch-run, ch-image and ch-convert (helpers_test.go) and, where a tag
// must be resolved, a fake HTTPS registry on the loopback interface: no
// Charliecloud, root or network needed.

// testMounts are the mount points every request asks for.
var testMounts = []string{"/builds/ci", "/scratch/data"}

// request is a pull of ref for job key. Insecure is set: the fake registry's
// certificate is self-signed, as a listed insecure registry's may be.
func (f *fakeCharliecloud) request(ref mechanism.Ref, key, policy string, cred auth.Credential, log io.Writer) mechanism.PullRequest {
	return mechanism.PullRequest{
		Ref: ref, Policy: policy, Credential: cred, Insecure: true, JobKey: key,
		MountPoints: append([]string(nil), testMounts...), Dir: f.scripts, Log: joblog.New(log),
	}
}

// squashRequest is request with SingleFile.
func (f *fakeCharliecloud) squashRequest(ref mechanism.Ref, key, policy string, cred auth.Credential, log io.Writer) mechanism.PullRequest {
	req := f.request(ref, key, policy, cred, log)
	req.SingleFile = true
	return req
}

// tagFile is the store's tag record of ref (imagecache's layout).
func (f *fakeCharliecloud) tagFile(ref mechanism.Ref) string {
	return filepath.Join(f.storeRoot(), "tags", strings.NewReplacer("/", "%", ":", "+", "@", "=").Replace(ref.Full))
}

// entries are the store's published entries (without their .meta files).
func (f *fakeCharliecloud) entries(t *testing.T) []string {
	t.Helper()
	var out []string
	for _, n := range ls(t, filepath.Join(f.storeRoot(), "entries")) {
		if !strings.HasSuffix(n, ".meta") {
			out = append(out, n)
		}
	}
	return out
}

// assertStoreClean checks that a failed pull left nothing in the store: no
// entry, no build leftovers, no lease.
func (f *fakeCharliecloud) assertStoreClean(t *testing.T) {
	t.Helper()
	assert.Empty(t, f.entries(t), "no store entry")
	assert.Empty(t, ls(t, filepath.Join(f.storeRoot(), "tmp")), "no build leftovers")
	assert.Empty(t, ls(t, filepath.Join(f.storeRoot(), "refs")), "no lease")
}

func sameFile(t *testing.T, a, b string) bool {
	t.Helper()
	fa, err := os.Stat(a)
	require.NoError(t, err)
	fb, err := os.Stat(b)
	require.NoError(t, err)
	return os.SameFile(fa, fb)
}

func readString(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	return string(b)
}

func assertNoSecret(t *testing.T, what string, ss ...string) {
	t.Helper()
	for _, s := range ss {
		for _, secret := range []string{userPassword, jobToken} {
			require.NotContains(t, s, secret, "%s leaks a secret", what)
		}
	}
}

func TestPullCopyRunRelease(t *testing.T) {
	g := startRegistry(t)
	g.requireLogin("u", userPassword)
	f := newFake(t, config.Mechanism{}, map[string]string{"SECRET": "x", "https_proxy": "http://proxy:3128"})
	ref := g.ref(t)
	cred := userCredentialFor(t, g.host, userPassword)
	ctx := context.Background()
	var logBuf bytes.Buffer

	img, err := f.r.Pull(ctx, f.request(ref, "j42-build", config.PullAlways, cred, &logBuf))
	require.NoError(t, err)
	assert.Equal(t, 1, g.resolved(), "the tag was resolved with the user's credentials")
	assert.Equal(t, 1, f.pulls(t))

	// ch-image pulled exactly the resolved digest; the credential went in
	// its environment only.
	name := g.host + "/ci/tiny@" + digest1
	argv := f.lines(t, "pull-argv")
	assert.Equal(t, []string{"--auth", "--tls-no-verify", "-s", f.storage, "pull", name}, argv)
	assertNoSecret(t, "pull argv", argv...)
	env := f.lines(t, "pull-env")
	assert.Contains(t, env, "CH_IMAGE_USERNAME=u")
	assert.Contains(t, env, "CH_IMAGE_PASSWORD="+userPassword)
	assert.Contains(t, env, "CH_IMAGE_STORAGE="+f.storage)
	assert.Contains(t, env, "CH_IMAGE_CACHE=disabled")
	assert.Contains(t, env, "https_proxy=http://proxy:3128")
	assert.Contains(t, env, "PATH="+f.app+":"+toolPath)
	assert.NotContains(t, env, "SECRET=x")
	assert.Equal(t, []string{"/dev/null"}, f.lines(t, "pull-stdin"), "ch-image's stdin is closed")

	stored := f.stored(ref, digest1)
	assert.Equal(t, filepath.Join(f.storage, "img", strings.ReplaceAll(g.host, ":", "+")+"%ci%tiny@sha256+"+strings.Repeat("1", 64)), stored)
	copyDir := f.jobCopy("j42-build")
	assert.Positive(t, img.PullTime)
	assert.Positive(t, img.ReadyTime)
	assert.GreaterOrEqual(t, img.ReadyTime, img.PullTime)
	assert.Equal(t, mechanism.Image{
		Ref: ref.Full, Handle: "ci-exec-job:j42-build", Format: FormatStorage, Digest: digest1,
		Shell: "/bin/sh", RunOptions: []string{"--set-env"}, Private: []string{copyDir},
		Cache: "miss", PullTime: img.PullTime, ReadyTime: img.ReadyTime,
	}, img)

	// The job's copy has the mount points and shares the files of the
	// stored image, which stays as pulled.
	assert.DirExists(t, filepath.Join(copyDir, "builds/ci"))
	assert.DirExists(t, filepath.Join(copyDir, "scratch/data"))
	assert.True(t, sameFile(t, filepath.Join(stored, "bin/busybox"), filepath.Join(copyDir, "bin/busybox")))
	assert.NoDirExists(t, filepath.Join(stored, "builds"), "mount points only in the job's copy")
	assert.NoDirExists(t, filepath.Join(stored, "scratch"))
	assert.Equal(t, digest1, f.store(t).Tag(ref.Full))
	assert.Empty(t, f.entries(t), "nothing converted")
	assert.Contains(t, logBuf.String(), "ch-image pull "+name)
	assert.Contains(t, logBuf.String(), "pulling image:    "+name)
	assertNoSecret(t, "job log", logBuf.String())

	info, err := f.r.Probe(ctx)
	require.NoError(t, err)
	argv, _, err = f.r.Command(mechanism.RunSpec{
		Info: info, Image: img, Binds: []mechanism.Bind{mechanism.SamePath("/builds/ci")}, Workdir: "/builds/ci",
		Env: []string{"USER=ciuser"}, Argv: []string{img.Shell, "/builds/scripts/step_script"},
	})
	require.NoError(t, err)
	assert.Equal(t, []string{filepath.Join(f.app, "ch-run"), "-s", f.storage, "--bind=/builds/ci:/builds/ci", "--cd=/builds/ci",
		"--set-env", "ci-exec-job:j42-build", "--", "/bin/sh", "/builds/scripts/step_script"}, argv)

	// The next job: the registry is asked again (policy always), the
	// digest is unchanged, nothing is pulled; it gets its own copy.
	logBuf.Reset()
	img2, err := f.r.Pull(ctx, f.request(ref, "j43-build", config.PullAlways, cred, &logBuf))
	require.NoError(t, err)
	assert.Equal(t, 2, g.resolved())
	assert.Equal(t, 1, f.pulls(t), "a hit: ch-image not run again")
	assert.Equal(t, "hit", img2.Cache)
	assert.Zero(t, img2.PullTime)
	assert.Equal(t, digest1, img2.Digest)
	assert.Equal(t, "ci-exec-job:j43-build", img2.Handle)
	assert.Equal(t, []string{f.jobCopy("j43-build")}, img2.Private)
	assert.NotContains(t, logBuf.String(), "ch-image pull")
	assert.True(t, sameFile(t, filepath.Join(stored, "bin/busybox"), filepath.Join(f.jobCopy("j43-build"), "bin/busybox")))

	// Cleanup removes the job's copy only.
	require.NoError(t, f.r.Release(ctx, img, f.scripts))
	assert.NoDirExists(t, copyDir)
	assert.FileExists(t, filepath.Join(stored, "bin/busybox"))
	assert.DirExists(t, f.jobCopy("j43-build"))
	require.NoError(t, f.r.Release(ctx, img, f.scripts), "cleanup may run twice")
	require.NoError(t, f.r.Release(ctx, img2, f.scripts))
	assert.NoDirExists(t, f.jobCopy("j43-build"))
	assert.Equal(t, []string{filepath.Base(stored)}, ls(t, filepath.Join(f.storage, "img")))
}

// TestPullTagMoves: a tag pushed again is pulled anew with policy always;
// a job that started on the old digest keeps its image.
func TestPullTagMoves(t *testing.T) {
	g := startRegistry(t)
	f := newFake(t, config.Mechanism{}, nil)
	ref := g.ref(t)
	ctx := context.Background()
	img1, err := f.r.Pull(ctx, f.request(ref, "j1-first", config.PullAlways, auth.Credential{}, io.Discard))
	require.NoError(t, err)
	assert.Equal(t, []string{"--tls-no-verify", "-s", f.storage, "pull", g.host + "/ci/tiny@" + digest1}, f.lines(t, "pull-argv"),
		"anonymous: no --auth")

	g.set("ci/tiny:latest", digest2)
	img2, err := f.r.Pull(ctx, f.request(ref, "j2-second", config.PullAlways, auth.Credential{}, io.Discard))
	require.NoError(t, err)
	assert.Equal(t, 2, f.pulls(t))
	assert.Equal(t, g.host+"/ci/tiny@"+digest2, f.lines(t, "pull-argv")[4])
	assert.Equal(t, digest2, img2.Digest)
	assert.Equal(t, "miss", img2.Cache)
	assert.Equal(t, digest2, f.store(t).Tag(ref.Full))
	assert.Equal(t, ref.FamiliarAtDigest(digest1)+"\n", readString(t, filepath.Join(f.jobCopy("j1-first"), "etc/image-name")))
	assert.Equal(t, ref.FamiliarAtDigest(digest2)+"\n", readString(t, filepath.Join(f.jobCopy("j2-second"), "etc/image-name")))
	assert.DirExists(t, f.stored(ref, digest1))
	assert.DirExists(t, f.stored(ref, digest2))
	require.NoError(t, f.r.Release(ctx, img1, f.scripts))
	assert.DirExists(t, f.jobCopy("j2-second"))
}

// TestPullRetriedJob: prepare is retried with the same job key; the copy of
// the earlier attempt is replaced, not reused.
func TestPullRetriedJob(t *testing.T) {
	f := newFake(t, config.Mechanism{}, nil)
	ref := parsedRef(t, closedPort(t)+"/ci/tiny@"+digest1)
	ctx := context.Background()
	_, err := f.r.Pull(ctx, f.request(ref, "j42-build", config.PullAlways, auth.Credential{}, io.Discard))
	require.NoError(t, err)
	makeTree(t, f.jobCopy("j42-build"), []entry{file("stale", "from the first attempt", 0o644)})
	img, err := f.r.Pull(ctx, f.request(ref, "j42-build", config.PullAlways, auth.Credential{}, io.Discard))
	require.NoError(t, err)
	assert.Equal(t, 1, f.pulls(t))
	assert.NoFileExists(t, filepath.Join(f.jobCopy("j42-build"), "stale"))
	assert.DirExists(t, filepath.Join(f.jobCopy("j42-build"), "builds/ci"))
	assert.Equal(t, "/bin/sh", img.Shell)
}

// TestPullPinnedDigest: a reference with a digest needs no registry (the
// registry here is down) and is pulled as it is.
func TestPullPinnedDigest(t *testing.T) {
	f := newFake(t, config.Mechanism{}, nil)
	ref := parsedRef(t, closedPort(t)+"/ci/tiny@"+digest2)
	req := f.request(ref, "j42-build", config.PullAlways, auth.Credential{}, io.Discard)
	req.Insecure = false
	img, err := f.r.Pull(context.Background(), req)
	require.NoError(t, err)
	assert.Equal(t, digest2, img.Digest)
	assert.Equal(t, []string{"-s", f.storage, "pull", ref.Familiar}, f.lines(t, "pull-argv"))
	assert.DirExists(t, f.stored(ref, digest2))
	assert.Equal(t, "ci-exec-job:j42-build", img.Handle)
}

func TestPullIfNotPresent(t *testing.T) {
	g := startRegistry(t)
	f := newFake(t, config.Mechanism{}, nil)
	ref := g.ref(t)
	ctx := context.Background()

	img, err := f.r.Pull(ctx, f.request(ref, "j1-first", config.PullIfNotPresent, auth.Credential{}, io.Discard))
	require.NoError(t, err)
	assert.Equal(t, 1, g.resolved(), "absent: resolved")
	assert.Equal(t, 1, f.pulls(t), "absent: pulled")
	assert.Equal(t, "miss", img.Cache)

	// The tag moves in the registry; the stored image is used as is and
	// the registry is not asked.
	g.set("ci/tiny:latest", digest2)
	img, err = f.r.Pull(ctx, f.request(ref, "j2-second", config.PullIfNotPresent, auth.Credential{}, io.Discard))
	require.NoError(t, err)
	assert.Equal(t, 1, g.resolved(), "present: the registry is not asked")
	assert.Equal(t, 1, f.pulls(t), "present: not pulled again")
	assert.Equal(t, digest1, img.Digest)
	assert.Equal(t, "hit", img.Cache)
	assert.Equal(t, ref.FamiliarAtDigest(digest1)+"\n", readString(t, filepath.Join(f.jobCopy("j2-second"), "etc/image-name")))

	// The recorded image is gone from the storage: resolved and pulled anew.
	require.NoError(t, removeTree(f.stored(ref, digest1)))
	img, err = f.r.Pull(ctx, f.request(ref, "j3-third", config.PullIfNotPresent, auth.Credential{}, io.Discard))
	require.NoError(t, err)
	assert.Equal(t, 2, g.resolved())
	assert.Equal(t, 2, f.pulls(t))
	assert.Equal(t, digest2, img.Digest)
	assert.Equal(t, digest2, f.store(t).Tag(ref.Full))
}

func TestPullNever(t *testing.T) {
	t.Run("absent", func(t *testing.T) {
		g := startRegistry(t)
		f := newFake(t, config.Mechanism{}, nil)
		img, err := f.r.Pull(context.Background(), f.request(g.ref(t), "j42-build", config.PullNever, userCredentialFor(t, g.host, userPassword), io.Discard))
		require.Error(t, err)
		assert.Equal(t, failure.User, failure.ClassOf(err), err.Error())
		assert.Contains(t, err.Error(), "not in your image store")
		assert.Contains(t, err.Error(), g.ref(t).Full)
		assert.Empty(t, img.Handle)
		assert.Zero(t, g.resolved(), "never: the registry is not asked")
		assert.Zero(t, f.pulls(t), "ch-image not run")
		assert.NoDirExists(t, f.jobCopy("j42-build"))
		assert.NoFileExists(t, f.tagFile(g.ref(t)))
	})
	t.Run("absent, single file", func(t *testing.T) {
		g := startRegistry(t)
		f := newFake(t, config.Mechanism{}, nil)
		_, err := f.r.Pull(context.Background(), f.squashRequest(g.ref(t), "j42-build", config.PullNever, auth.Credential{}, io.Discard))
		require.Error(t, err)
		assert.Equal(t, failure.User, failure.ClassOf(err), err.Error())
		assert.Zero(t, g.resolved())
		assert.Zero(t, f.pulls(t))
		assert.Zero(t, f.converts(t))
		assert.NoDirExists(t, f.mnt("j42-build"))
		f.assertStoreClean(t)
	})
	t.Run("present", func(t *testing.T) {
		g := startRegistry(t)
		f := newFake(t, config.Mechanism{}, nil)
		_, err := f.r.Pull(context.Background(), f.request(g.ref(t), "j1-first", config.PullAlways, auth.Credential{}, io.Discard))
		require.NoError(t, err)
		img, err := f.r.Pull(context.Background(), f.request(g.ref(t), "j42-build", config.PullNever, auth.Credential{}, io.Discard))
		require.NoError(t, err)
		assert.Equal(t, 1, g.resolved())
		assert.Equal(t, 1, f.pulls(t))
		assert.Equal(t, digest1, img.Digest)
		assert.Equal(t, "hit", img.Cache)
		assert.DirExists(t, filepath.Join(f.jobCopy("j42-build"), "builds/ci"))
	})
	t.Run("pinned digest present", func(t *testing.T) {
		f := newFake(t, config.Mechanism{}, nil)
		ref := parsedRef(t, closedPort(t)+"/ci/tiny@"+digest1)
		_, err := f.r.Pull(context.Background(), f.request(ref, "j1-first", config.PullAlways, auth.Credential{}, io.Discard))
		require.NoError(t, err)
		img, err := f.r.Pull(context.Background(), f.request(ref, "j42-build", config.PullNever, auth.Credential{}, io.Discard))
		require.NoError(t, err)
		assert.Equal(t, 1, f.pulls(t))
		assert.Equal(t, digest1, img.Digest)
	})

	refused := []struct {
		name  string
		setup func(t *testing.T, f *fakeCharliecloud, ref mechanism.Ref)
	}{
		{"pinned digest absent", nil},
		{"tag record without its image", func(t *testing.T, f *fakeCharliecloud, ref mechanism.Ref) {
			require.NoError(t, f.store(t).SetTag(ref.Full, digest1))
		}},
		{"image dir without ch/, as a killed pull may leave", func(t *testing.T, f *fakeCharliecloud, ref mechanism.Ref) {
			require.NoError(t, f.store(t).SetTag(ref.Full, digest1))
			makeTree(t, f.stored(ref, digest1), []entry{file("bin/sh", "#!", 0o755)})
		}},
		{"a tag record that is not a digest", func(t *testing.T, f *fakeCharliecloud, ref mechanism.Ref) {
			st := f.store(t)
			require.NoError(t, st.SetTag(ref.Full, digest1))
			require.FileExists(t, f.tagFile(ref), "the test plants the record where the store keeps it")
			require.NoError(t, os.WriteFile(f.tagFile(ref), []byte("sha256:../../../etc/passwd\n"), 0o600))
			require.Empty(t, st.Tag(ref.Full))
			makeTree(t, filepath.Join(f.storage, "img", forPath(ref.Familiar+"@sha256:../../../etc/passwd"), "ch"), nil)
		}},
	}
	for _, tt := range refused {
		t.Run(tt.name, func(t *testing.T) {
			f := newFake(t, config.Mechanism{}, nil)
			ref := parsedRef(t, "127.0.0.1:5443/ci/tiny:latest")
			if tt.setup == nil {
				ref = parsedRef(t, "127.0.0.1:5443/ci/tiny@"+digest1)
			} else {
				tt.setup(t, f, ref)
			}
			_, err := f.r.Pull(context.Background(), f.request(ref, "j42-build", config.PullNever, auth.Credential{}, io.Discard))
			require.Error(t, err)
			assert.Equal(t, failure.User, failure.ClassOf(err), err.Error())
			assert.Contains(t, err.Error(), "not in your image store")
			assert.Zero(t, f.pulls(t))
			assert.NoDirExists(t, f.jobCopy("j42-build"))
		})
	}
}

func TestPullSingleFile(t *testing.T) {
	g := startRegistry(t)
	g.requireLogin("u", userPassword)
	f := newFake(t, config.Mechanism{}, map[string]string{"https_proxy": "http://proxy:3128"})
	ref := g.ref(t)
	cred := userCredentialFor(t, g.host, userPassword)
	ctx := context.Background()
	var logBuf bytes.Buffer

	img, err := f.r.Pull(ctx, f.squashRequest(ref, "j42-build", config.PullAlways, cred, &logBuf))
	require.NoError(t, err)
	assert.Equal(t, 1, g.resolved())
	assert.Equal(t, 1, f.pulls(t))
	assert.Equal(t, 1, f.converts(t))
	assert.Equal(t, []string{"--auth", "--tls-no-verify", "-s", f.storage, "pull", g.host + "/ci/tiny@" + digest1}, f.lines(t, "pull-argv"))

	// ch-convert squashed a copy of the stored image with the mount points
	// inside, from a build dir of the store, without any credential.
	st := f.store(t)
	key := squashKey(digest1, testMounts)
	entry := st.Path(key)
	cargv := f.lines(t, "convert-argv")
	require.Len(t, cargv, 6, cargv)
	assert.Equal(t, []string{"-i", "dir", "-o", "squash"}, cargv[:4])
	assert.Equal(t, cargv[5]+".d", cargv[4], "the image dir is next to the output")
	assert.Equal(t, filepath.Join(f.storeRoot(), "tmp"), filepath.Dir(cargv[5]))
	assert.True(t, strings.HasPrefix(filepath.Base(cargv[5]), key+"."), cargv[5])
	tree := f.lines(t, "convert-tree")
	for _, p := range []string{"./bin/sh", "./bin/busybox", "./ch/environment", "./builds/ci", "./scratch/data"} {
		assert.Contains(t, tree, p)
	}
	cenv := f.lines(t, "convert-env")
	assert.Contains(t, cenv, "CH_IMAGE_STORAGE="+f.storage)
	for _, kv := range cenv {
		assert.False(t, strings.HasPrefix(kv, "CH_IMAGE_USERNAME="), kv)
		assert.False(t, strings.HasPrefix(kv, "CH_IMAGE_PASSWORD="), kv)
	}
	assertNoSecret(t, "convert argv and env", append(cargv, cenv...)...)
	assert.Equal(t, []string{"/dev/null"}, f.lines(t, "convert-stdin"))

	mnt := f.mnt("j42-build")
	assert.Positive(t, img.PullTime)
	assert.Positive(t, img.ConvertTime)
	assert.Positive(t, img.ReadyTime)
	assert.NotEmpty(t, img.Lease)
	assert.Equal(t, mechanism.Image{
		Ref: ref.Full, Handle: entry, Format: FormatSquash, Digest: digest1, Shell: "/bin/sh",
		RunOptions: []string{"--mount=" + mnt, "--set-env"}, Private: []string{mnt}, Lease: img.Lease,
		Cache: "miss", PullTime: img.PullTime, ConvertTime: img.ConvertTime, ReadyTime: img.ReadyTime,
	}, img)
	assert.Equal(t, filepath.Join(f.storeRoot(), "refs", key, "j42-build"), img.Lease)
	assert.FileExists(t, img.Lease)
	assert.DirExists(t, mnt)
	assert.Equal(t, string(sqfsHeader())+strings.Join(tree, "\n")+"\n", readString(t, entry), "the entry is what ch-convert wrote")
	assert.Equal(t, "/bin/sh", st.Meta(key, "shell"))
	assert.Equal(t, "yes", st.Meta(key, "setenv"))
	assert.Equal(t, []string{key}, f.entries(t))
	assert.Empty(t, ls(t, filepath.Join(f.storeRoot(), "tmp")), "the build dir is gone")
	assert.NoDirExists(t, f.jobCopy("j42-build"), "no per-job copy in the storage")
	assert.NoDirExists(t, filepath.Join(f.stored(ref, digest1), "builds"), "the stored image is not changed")
	assert.Equal(t, digest1, st.Tag(ref.Full))
	assert.Contains(t, logBuf.String(), "ch-convert "+ref.Full+" to SquashFS")
	assertNoSecret(t, "job log", logBuf.String())

	info, err := f.r.Probe(ctx)
	require.NoError(t, err)
	argv, _, err := f.r.Command(mechanism.RunSpec{
		Info: info, Image: img, Binds: []mechanism.Bind{mechanism.SamePath("/builds/ci")}, Workdir: "/builds/ci",
		Env: []string{"USER=ciuser"}, Argv: []string{img.Shell, "/builds/scripts/step_script"},
	})
	require.NoError(t, err)
	assert.Equal(t, []string{filepath.Join(f.app, "ch-run"), "--bind=/builds/ci:/builds/ci", "--cd=/builds/ci",
		"--mount=" + mnt, "--set-env", entry, "--", "/bin/sh", "/builds/scripts/step_script"}, argv)

	// The next job with the same mount points: a hit, neither pulled nor
	// converted; its own lease and mount dir.
	img2, err := f.r.Pull(ctx, f.squashRequest(ref, "j43-build", config.PullAlways, cred, io.Discard))
	require.NoError(t, err)
	assert.Equal(t, 2, g.resolved())
	assert.Equal(t, 1, f.pulls(t))
	assert.Equal(t, 1, f.converts(t))
	assert.Equal(t, "hit", img2.Cache)
	assert.Zero(t, img2.PullTime)
	assert.Zero(t, img2.ConvertTime)
	assert.Equal(t, entry, img2.Handle)
	assert.Equal(t, []string{"--mount=" + f.mnt("j43-build"), "--set-env"}, img2.RunOptions)
	assert.Equal(t, []string{f.mnt("j43-build")}, img2.Private)
	assert.Equal(t, filepath.Join(f.storeRoot(), "refs", key, "j43-build"), img2.Lease)

	// Cleanup ends the job's lease and removes its mount dir; the entry
	// stays for the next job.
	require.NoError(t, f.r.Release(ctx, img, f.scripts))
	assert.NoFileExists(t, img.Lease)
	assert.NoDirExists(t, mnt)
	assert.FileExists(t, entry)
	assert.FileExists(t, img2.Lease)
	assert.DirExists(t, f.mnt("j43-build"))
	require.NoError(t, f.r.Release(ctx, img, f.scripts), "cleanup may run twice")
	require.NoError(t, f.r.Release(ctx, img2, f.scripts))
	assert.Empty(t, ls(t, filepath.Join(f.storeRoot(), "refs")))
	assert.FileExists(t, entry)
}

// TestPullSingleFileMountSets: the mount points are part of the entry's
// key. Another set is converted again (from the stored image, not pulled
// again); the first entry is not changed.
func TestPullSingleFileMountSets(t *testing.T) {
	f := newFake(t, config.Mechanism{}, nil)
	ref := parsedRef(t, closedPort(t)+"/ci/tiny@"+digest1)
	ctx := context.Background()
	img1, err := f.r.Pull(ctx, f.squashRequest(ref, "j1-first", config.PullAlways, auth.Credential{}, io.Discard))
	require.NoError(t, err)
	before := readString(t, img1.Handle)

	// The same set in another order is the same entry.
	req := f.squashRequest(ref, "j2-second", config.PullAlways, auth.Credential{}, io.Discard)
	req.MountPoints = []string{"/scratch/data", "/builds/ci"}
	img2, err := f.r.Pull(ctx, req)
	require.NoError(t, err)
	assert.Equal(t, img1.Handle, img2.Handle)
	assert.Equal(t, "hit", img2.Cache)
	assert.Equal(t, 1, f.converts(t))

	req = f.squashRequest(ref, "j3-third", config.PullAlways, auth.Credential{}, io.Discard)
	req.MountPoints = []string{"/builds/ci", "/other/volume"}
	img3, err := f.r.Pull(ctx, req)
	require.NoError(t, err)
	assert.Equal(t, 1, f.pulls(t), "the stored image is converted again, not pulled again")
	assert.Equal(t, 2, f.converts(t))
	assert.Equal(t, "miss", img3.Cache)
	assert.Zero(t, img3.PullTime)
	assert.Positive(t, img3.ConvertTime)
	assert.NotEqual(t, img1.Handle, img3.Handle)
	assert.Equal(t, f.store(t).Path(squashKey(digest1, req.MountPoints)), img3.Handle)
	tree := f.lines(t, "convert-tree")
	assert.Contains(t, tree, "./other/volume")
	assert.NotContains(t, tree, "./scratch/data")
	assert.Equal(t, before, readString(t, img1.Handle))
	assert.ElementsMatch(t, []string{filepath.Base(img1.Handle), filepath.Base(img3.Handle)}, f.entries(t))
	assert.NoDirExists(t, filepath.Join(f.stored(ref, digest1), "other"))
}

// TestPullSingleFileWithoutEnvironment: an image without ENV settings is
// run without --set-env, also when the entry is found later.
func TestPullSingleFileWithoutEnvironment(t *testing.T) {
	f := newFake(t, config.Mechanism{}, nil)
	f.set(t, "no-env", "")
	f.set(t, "pull-hook", `rm "$d/bin/sh"; printf '#!' > "$d/bin/bash"; chmod 755 "$d/bin/bash"`+"\n")
	ref := parsedRef(t, closedPort(t)+"/ci/tiny@"+digest1)
	ctx := context.Background()
	img, err := f.r.Pull(ctx, f.squashRequest(ref, "j1-first", config.PullAlways, auth.Credential{}, io.Discard))
	require.NoError(t, err)
	key := squashKey(digest1, testMounts)
	assert.Equal(t, "no", f.store(t).Meta(key, "setenv"))
	assert.Equal(t, "/bin/bash", f.store(t).Meta(key, "shell"))
	assert.Equal(t, []string{"--mount=" + f.mnt("j1-first")}, img.RunOptions)
	assert.Equal(t, "/bin/bash", img.Shell)

	img, err = f.r.Pull(ctx, f.squashRequest(ref, "j2-second", config.PullAlways, auth.Credential{}, io.Discard))
	require.NoError(t, err)
	assert.Equal(t, "hit", img.Cache)
	assert.Equal(t, []string{"--mount=" + f.mnt("j2-second")}, img.RunOptions)
	assert.Equal(t, "/bin/bash", img.Shell, "the shell comes from the entry's meta")
}

// TestPullSingleFileEntryWithoutMeta: an entry whose shell is not recorded
// is not used blindly.
func TestPullSingleFileEntryWithoutMeta(t *testing.T) {
	f := newFake(t, config.Mechanism{}, nil)
	ref := parsedRef(t, closedPort(t)+"/ci/tiny@"+digest1)
	ctx := context.Background()
	_, err := f.r.Pull(ctx, f.squashRequest(ref, "j1-first", config.PullAlways, auth.Credential{}, io.Discard))
	require.NoError(t, err)
	require.NoError(t, os.Remove(f.store(t).Path(squashKey(digest1, testMounts))+".meta"))
	_, err = f.r.Pull(ctx, f.squashRequest(ref, "j2-second", config.PullAlways, auth.Credential{}, io.Discard))
	require.Error(t, err)
	assert.Equal(t, failure.System, failure.ClassOf(err))
	assert.Contains(t, err.Error(), "no recorded shell")
	assert.NoFileExists(t, filepath.Join(f.storeRoot(), "refs", squashKey(digest1, testMounts), "j2-second"))
}

// TestPullSingleFileDamagedEntry: a truncated entry is rebuilt.
func TestPullSingleFileDamagedEntry(t *testing.T) {
	f := newFake(t, config.Mechanism{}, nil)
	ref := parsedRef(t, closedPort(t)+"/ci/tiny@"+digest1)
	ctx := context.Background()
	img, err := f.r.Pull(ctx, f.squashRequest(ref, "j1-first", config.PullAlways, auth.Credential{}, io.Discard))
	require.NoError(t, err)
	require.NoError(t, os.Truncate(img.Handle, 50))
	img, err = f.r.Pull(ctx, f.squashRequest(ref, "j2-second", config.PullAlways, auth.Credential{}, io.Discard))
	require.NoError(t, err)
	assert.Equal(t, "miss", img.Cache)
	assert.Equal(t, 2, f.converts(t))
	assert.Equal(t, 1, f.pulls(t))
	fi, err := os.Stat(img.Handle)
	require.NoError(t, err)
	assert.Greater(t, fi.Size(), int64(96))
}

// TestPullSingleFileFromStorage: an image already in the ch-image storage
// (pulled by an earlier job without conversion) needs no network to be
// converted. With pull policy never or if-not-present it must be used.
func TestPullSingleFileFromStorage(t *testing.T) {
	for _, policy := range []string{config.PullNever, config.PullIfNotPresent} {
		t.Run(policy, func(t *testing.T) {
			g := startRegistry(t)
			f := newFake(t, config.Mechanism{}, nil)
			ref := g.ref(t)
			ctx := context.Background()
			_, err := f.r.Pull(ctx, f.request(ref, "j1-first", config.PullAlways, auth.Credential{}, io.Discard))
			require.NoError(t, err)
			g.set("ci/tiny:latest", digest2)
			img, err := f.r.Pull(ctx, f.squashRequest(ref, "j2-second", policy, auth.Credential{}, io.Discard))
			require.NoError(t, err)
			assert.Equal(t, 1, g.resolved(), "the tag record is used")
			assert.Equal(t, 1, f.pulls(t))
			assert.Equal(t, 1, f.converts(t))
			assert.Equal(t, digest1, img.Digest)
		})
	}
}

// TestConcurrentJobsPullOnce: jobs of the same user that need the same
// image at once run ch-image once.
func TestConcurrentJobsPullOnce(t *testing.T) {
	for _, single := range []bool{false, true} {
		name := "copy"
		if single {
			name = "single file"
		}
		t.Run(name, func(t *testing.T) {
			g := startRegistry(t)
			f := newFake(t, config.Mechanism{}, nil)
			f.set(t, "pull-sleep", "0.5")
			f.set(t, "convert-sleep", "0.3")
			ref := g.ref(t)
			keys := []string{"j1-a", "j2-b", "j3-c"}
			imgs := make([]mechanism.Image, len(keys))
			errs := make([]error, len(keys))
			var wg sync.WaitGroup
			for i, k := range keys {
				wg.Add(1)
				go func() {
					defer wg.Done()
					req := f.request(ref, k, config.PullAlways, auth.Credential{}, io.Discard)
					req.SingleFile = single
					imgs[i], errs[i] = f.r.Pull(context.Background(), req)
				}()
			}
			wg.Wait()
			var caches []string
			for i := range keys {
				require.NoError(t, errs[i])
				assert.Equal(t, digest1, imgs[i].Digest)
				assert.Equal(t, "/bin/sh", imgs[i].Shell)
				caches = append(caches, imgs[i].Cache)
			}
			assert.Equal(t, 1, f.pulls(t), "pulled once")
			if single {
				assert.Equal(t, 1, f.converts(t), "converted once")
				assert.ElementsMatch(t, []string{"miss", "hit after waiting (another job built it)", "hit after waiting (another job built it)"}, caches)
				assert.Equal(t, imgs[0].Handle, imgs[1].Handle)
				assert.Len(t, ls(t, filepath.Join(f.storeRoot(), "refs", squashKey(digest1, testMounts))), 3, "three leases")
			} else {
				assert.Zero(t, f.converts(t))
				for _, k := range keys {
					assert.DirExists(t, filepath.Join(f.jobCopy(k), "builds/ci"))
				}
			}
		})
	}
}

func TestPullCredentials(t *testing.T) {
	t.Run("job token", func(t *testing.T) {
		g := startRegistry(t)
		g.requireLogin(auth.JobTokenUser, jobToken)
		f := newFake(t, config.Mechanism{}, nil)
		var logBuf bytes.Buffer
		_, err := f.r.Pull(context.Background(), f.squashRequest(g.ref(t), "j42-build", config.PullAlways, jobTokenFor(t, g.host), &logBuf))
		require.NoError(t, err)
		env := f.lines(t, "pull-env")
		assert.Contains(t, env, "CH_IMAGE_USERNAME=gitlab-ci-token")
		assert.Contains(t, env, "CH_IMAGE_PASSWORD="+jobToken)
		assertNoSecret(t, "pull argv", f.lines(t, "pull-argv")...)
		assertNoSecret(t, "convert argv and env", append(f.lines(t, "convert-argv"), f.lines(t, "convert-env")...)...)
		assertNoSecret(t, "job log", logBuf.String())
	})
	t.Run("anonymous", func(t *testing.T) {
		g := startRegistry(t)
		f := newFake(t, config.Mechanism{}, map[string]string{"CH_IMAGE_PASSWORD": "host-password"})
		_, err := f.r.Pull(context.Background(), f.request(g.ref(t), "j42-build", config.PullAlways, auth.Credential{}, io.Discard))
		require.NoError(t, err)
		assert.NotContains(t, f.lines(t, "pull-argv"), "--auth")
		for _, kv := range f.lines(t, "pull-env") {
			assert.False(t, strings.HasPrefix(kv, "CH_IMAGE_USERNAME="), kv)
			assert.False(t, strings.HasPrefix(kv, "CH_IMAGE_PASSWORD="), kv)
		}
	})
}

// TestPullFailures: ch-image or the image fails. The references are pinned,
// so no registry is involved.
func TestPullFailures(t *testing.T) {
	anonymous := func(*testing.T) auth.Credential { return auth.Credential{} }
	tests := []struct {
		name    string
		setup   func(t *testing.T, f *fakeCharliecloud)
		cred    func(t *testing.T) auth.Credential
		class   failure.Class
		wantErr string
	}{
		{"registry refuses user credentials", func(t *testing.T, f *fakeCharliecloud) {
			f.set(t, "pull-fail", "error: no further authentication possible, giving up\n")
		}, userCredential, failure.User, "CH_IMAGE_USERNAME/CH_IMAGE_PASSWORD"},
		{"registry refuses job token", func(t *testing.T, f *fakeCharliecloud) {
			f.set(t, "pull-fail", "error: no further authentication possible, giving up\n")
		}, jobTokenCredential, failure.System, "job token"},
		{"not found", func(t *testing.T, f *fakeCharliecloud) {
			f.set(t, "pull-fail", "error: unauthorized or not in registry: 127.0.0.1:5443/ci/tiny\n")
		}, anonymous, failure.User, "image not found"},
		{"unknown error", func(t *testing.T, f *fakeCharliecloud) {
			f.set(t, "pull-fail", "error: something new\n")
		}, anonymous, failure.System, "ch-image failed: error: something new"},
		{"exit 0 without an image", func(t *testing.T, f *fakeCharliecloud) { f.set(t, "pull-nowrite", "") },
			anonymous, failure.System, "succeeded but the image is not in the storage"},
		{"image without a shell", func(t *testing.T, f *fakeCharliecloud) {
			f.set(t, "pull-hook", `rm "$d/bin/sh" "$d/bin/busybox"`+"\n")
		}, anonymous, failure.User, "neither bash nor sh"},
		{"mount point through a symlink", func(t *testing.T, f *fakeCharliecloud) {
			f.set(t, "pull-hook", `mkdir -p "$OUTSIDE"; ln -s "$OUTSIDE" "$d/scratch"`+"\n")
		}, anonymous, failure.User, "symlink at /scratch"},
		{"mount point blocked by a file", func(t *testing.T, f *fakeCharliecloud) {
			f.set(t, "pull-hook", `touch "$d/scratch"`+"\n")
		}, anonymous, failure.System, "in the way"},
		{"no ch-image", func(t *testing.T, f *fakeCharliecloud) {
			require.NoError(t, os.Remove(filepath.Join(f.app, "ch-image")))
		}, anonymous, failure.System, "ch-image not found"},
		{"storage is a symlink", func(t *testing.T, f *fakeCharliecloud) {
			elsewhere := filepath.Join(filepath.Dir(f.images), "elsewhere")
			require.NoError(t, os.Mkdir(elsewhere, 0o700))
			require.NoError(t, os.Symlink(elsewhere, f.storage))
		}, anonymous, failure.System, "not a directory"},
	}
	for _, tt := range tests {
		for _, single := range []bool{false, true} {
			name := tt.name
			if single {
				name += ", single file"
			}
			t.Run(name, func(t *testing.T) {
				f := newFake(t, config.Mechanism{}, nil)
				tt.setup(t, f)
				var logBuf bytes.Buffer
				ref := parsedRef(t, "127.0.0.1:5443/ci/tiny@"+digest1)
				req := f.request(ref, "j42-build", config.PullAlways, tt.cred(t), &logBuf)
				req.SingleFile = single
				_, err := f.r.Pull(context.Background(), req)
				require.Error(t, err)
				assert.Equal(t, tt.class, failure.ClassOf(err), err.Error())
				assert.Contains(t, err.Error(), tt.wantErr)
				assertNoSecret(t, "error", err.Error())
				assertNoSecret(t, "job log", logBuf.String())
				assert.NoDirExists(t, f.jobCopy("j42-build"), "no job copy left behind")
				assert.NoDirExists(t, f.mnt("j42-build"), "no mount dir left behind")
				assert.NoDirExists(t, filepath.Join(filepath.Dir(f.storage), "outside", "data"), "nothing created outside the image")
				assert.NoFileExists(t, f.tagFile(ref), "no tag record for a failed pull")
				assert.Zero(t, f.converts(t), "nothing converted")
				f.assertStoreClean(t)
			})
		}
	}
}

// TestConvertFailures: ch-convert is missing or fails.
func TestConvertFailures(t *testing.T) {
	tests := []struct {
		name    string
		setup   func(t *testing.T, f *fakeCharliecloud)
		wantErr string
	}{
		{"no ch-convert", func(t *testing.T, f *fakeCharliecloud) {
			require.NoError(t, os.Remove(filepath.Join(f.app, "ch-convert")))
		}, "ch-convert not found"},
		{"ch-convert fails", func(t *testing.T, f *fakeCharliecloud) {
			f.set(t, "convert-fail", "ch-convert[1]: error: mksquashfs failed\n")
		}, "ch-convert[1]: error: mksquashfs failed"},
		{"ch-convert writes no SquashFS", func(t *testing.T, f *fakeCharliecloud) { f.set(t, "convert-garbage", "") },
			"not a SquashFS file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFake(t, config.Mechanism{}, nil)
			tt.setup(t, f)
			ref := parsedRef(t, "127.0.0.1:5443/ci/tiny@"+digest1)
			_, err := f.r.Pull(context.Background(), f.squashRequest(ref, "j42-build", config.PullAlways, auth.Credential{}, io.Discard))
			require.Error(t, err)
			assert.Equal(t, failure.System, failure.ClassOf(err), err.Error())
			assert.Contains(t, err.Error(), tt.wantErr)
			assert.NoDirExists(t, f.mnt("j42-build"))
			assert.NoFileExists(t, f.tagFile(ref))
			f.assertStoreClean(t)
		})
	}
}

// TestPullResolveFailures: a tag that cannot be resolved stops the pull
// before ch-image runs, with the same classes as a failed pull.
func TestPullResolveFailures(t *testing.T) {
	tests := []struct {
		name    string
		login   bool // the registry wants u's password
		cred    func(t *testing.T, host string) auth.Credential
		tag     string
		secure  bool // the registry is not listed as insecure
		down    bool
		class   failure.Class
		wantErr string
	}{
		{name: "anonymous, login needed", login: true, cred: func(*testing.T, string) auth.Credential { return auth.Credential{} },
			class: failure.User, wantErr: "set CH_IMAGE_USERNAME and CH_IMAGE_PASSWORD"},
		{name: "wrong password", login: true, cred: func(t *testing.T, h string) auth.Credential { return userCredentialFor(t, h, "wrong-password-1") },
			class: failure.User, wantErr: "refused the credentials in CH_IMAGE_USERNAME/CH_IMAGE_PASSWORD"},
		{name: "job token refused", login: true, cred: jobTokenFor, class: failure.System, wantErr: "job token"},
		{name: "unknown tag", cred: func(t *testing.T, h string) auth.Credential { return userCredentialFor(t, h, userPassword) }, tag: "nope",
			class: failure.User, wantErr: "image not found"},
		{name: "self-signed certificate, not listed", cred: func(*testing.T, string) auth.Credential { return auth.Credential{} }, secure: true,
			class: failure.System, wantErr: "TLS certificate"},
		{name: "registry down", cred: func(*testing.T, string) auth.Credential { return auth.Credential{} }, down: true,
			class: failure.System, wantErr: "unreachable"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := startRegistry(t)
			if tt.login {
				g.requireLogin("u", userPassword)
			}
			host := g.host
			if tt.down {
				host = closedPort(t)
			}
			tag := "latest"
			if tt.tag != "" {
				tag = tt.tag
			}
			f := newFake(t, config.Mechanism{}, nil)
			ref := parsedRef(t, host+"/ci/tiny:"+tag)
			req := f.squashRequest(ref, "j42-build", config.PullAlways, tt.cred(t, host), io.Discard)
			req.Insecure = !tt.secure
			_, err := f.r.Pull(context.Background(), req)
			require.Error(t, err)
			assert.Equal(t, tt.class, failure.ClassOf(err), err.Error())
			assert.Contains(t, err.Error(), tt.wantErr)
			assert.Contains(t, err.Error(), ref.Full)
			assertNoSecret(t, "error", err.Error())
			assert.NotContains(t, err.Error(), "wrong-password-1")
			assert.Zero(t, f.pulls(t), "ch-image not run")
			assert.NoFileExists(t, f.tagFile(ref))
			f.assertStoreClean(t)
		})
	}
}

// TestFailedPullKeepsTheStoredImage: when the tag moved and pulling the new
// digest fails, the image stored before and the tag record stay as they
// were, so if-not-present jobs keep working.
func TestFailedPullKeepsTheStoredImage(t *testing.T) {
	g := startRegistry(t)
	f := newFake(t, config.Mechanism{}, nil)
	ref := g.ref(t)
	ctx := context.Background()
	_, err := f.r.Pull(ctx, f.request(ref, "j1-first", config.PullAlways, auth.Credential{}, io.Discard))
	require.NoError(t, err)

	g.set("ci/tiny:latest", digest2)
	f.set(t, "pull-fail", "error: HTTPSConnectionPool(host='x', port=1): Max retries exceeded (Connection refused)\n")
	_, err = f.r.Pull(ctx, f.request(ref, "j2-second", config.PullAlways, auth.Credential{}, io.Discard))
	require.Error(t, err)
	assert.Equal(t, failure.System, failure.ClassOf(err))
	assert.Contains(t, err.Error(), "unreachable")
	assert.DirExists(t, f.stored(ref, digest1))
	assert.NoDirExists(t, f.stored(ref, digest2))
	assert.Equal(t, digest1, f.store(t).Tag(ref.Full))
	assert.NoDirExists(t, f.jobCopy("j2-second"))

	img, err := f.r.Pull(ctx, f.request(ref, "j2-second", config.PullIfNotPresent, auth.Credential{}, io.Discard))
	require.NoError(t, err)
	assert.Equal(t, digest1, img.Digest)
}

// TestConvertTmpDir: tmp_dir gives ch-convert a per-user scratch dir.
func TestConvertTmpDir(t *testing.T) {
	shared := t.TempDir()
	require.NoError(t, os.Chmod(shared, 0o1777))
	f := newFake(t, config.Mechanism{TmpDir: shared}, nil)
	ref := parsedRef(t, "127.0.0.1:5443/ci/tiny@"+digest1)
	_, err := f.r.Pull(context.Background(), f.squashRequest(ref, "j42-build", config.PullAlways, auth.Credential{}, io.Discard))
	require.NoError(t, err)
	argv := f.lines(t, "convert-argv")
	require.Len(t, argv, 8, argv)
	assert.Equal(t, []string{"-i", "dir", "-o", "squash", "--tmp", filepath.Join(shared, testUser)}, argv[:6])
	fi, err := os.Lstat(filepath.Join(shared, testUser))
	require.NoError(t, err)
	assert.True(t, fi.IsDir())
	assert.Equal(t, os.FileMode(0o700), fi.Mode().Perm())

	t.Run("per-user tmp dir is a symlink", func(t *testing.T) {
		shared := t.TempDir()
		elsewhere := t.TempDir()
		require.NoError(t, os.Symlink(elsewhere, filepath.Join(shared, testUser)))
		f := newFake(t, config.Mechanism{TmpDir: shared}, nil)
		_, err := f.r.Pull(context.Background(), f.squashRequest(ref, "j42-build", config.PullAlways, auth.Credential{}, io.Discard))
		require.Error(t, err)
		assert.Equal(t, failure.System, failure.ClassOf(err))
		assert.Contains(t, err.Error(), "general.charliecloud.tmp_dir")
		assert.Zero(t, f.converts(t))
		assert.Empty(t, ls(t, elsewhere))
		f.assertStoreClean(t)
	})
}
