package charliecloud

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/mechanism/mechtest"
	"github.com/ci-exec/ci-exec/internal/policy"
)

// These tests run Pull, Command and Release against shell-script stand-ins
// for ch-run, ch-image and ch-convert (helpers_test.go) and, where a tag
// must be resolved, a fake HTTPS registry on the loopback interface: no
// Charliecloud, root or network needed.

// testMounts are the mount points every request asks for.
var testMounts = []string{"/builds/ci", "/scratch/data"}

// suite is the pull scenarios Charliecloud shares with Apptainer (package
// mechtest), with what Charliecloud checks of its own: a job gets its own
// copy of the image stored in ch-image's storage, with the mount points.
var suite = mechtest.Suite[*fakeCharliecloud]{
	Install:    newFake,
	Scheme:     mechtest.SelfSignedTLS,
	Creds:      creds,
	Password:   userPassword,
	Token:      jobToken,
	Secrets:    secrets,
	Tool:       "ch-image",
	Image:      "image",
	NotListed:  mechtest.Failure{Name: "self-signed certificate, not listed", WantErr: "TLS certificate"},
	SingleFile: true,
	Refused:    "error: HTTPSConnectionPool(host='x', port=1): Max retries exceeded (Connection refused)\n",

	Got: func(t *testing.T, f *fakeCharliecloud, ref policy.Ref, img mechanism.Image, key, digest string) {
		t.Helper()
		assert.Equal(t, "ci-exec-job:"+key, img.Handle)
		assert.Equal(t, []string{f.jobCopy(key)}, img.Private)
		assert.Equal(t, "/bin/sh", img.Shell)
		assert.Equal(t, ref.FamiliarAtDigest(digest)+"\n", mechtest.ReadString(t, filepath.Join(f.jobCopy(key), "etc/image-name")))
		for _, m := range testMounts {
			assert.DirExists(t, filepath.Join(f.jobCopy(key), m))
		}
	},
	Remove: func(t *testing.T, f *fakeCharliecloud, ref policy.Ref, digest string) {
		require.NoError(t, removeTree(f.stored(ref, digest)))
	},
	Kept: func(t *testing.T, f *fakeCharliecloud, ref policy.Ref, key string) {
		assert.DirExists(t, f.stored(ref, mechtest.Digest1))
		assert.NoDirExists(t, f.stored(ref, mechtest.Digest2))
		assert.NoDirExists(t, f.jobCopy(key))
	},
	Untouched: func(t *testing.T, f *fakeCharliecloud, key string) {
		assert.NoDirExists(t, f.jobCopy(key))
		assert.NoDirExists(t, f.mnt(key))
		assert.Zero(t, f.converts(t), "nothing converted")
	},
	Plant: func(t *testing.T, f *fakeCharliecloud, ref policy.Ref, digest string) {
		makeTree(t, filepath.Join(f.Storage, "img", forPath(ref.Familiar+"@"+digest), "ch"), nil)
	},
}

// squashRequest is a request with SingleFile.
func (f *fakeCharliecloud) squashRequest(ref policy.Ref, key, policy string, cred auth.Credential, log io.Writer) mechanism.PullRequest {
	req := f.Request(ref, key, policy, cred, log)
	req.SingleFile = true
	return req
}

func sameFile(t *testing.T, a, b string) bool {
	t.Helper()
	fa, err := os.Stat(a)
	require.NoError(t, err)
	fb, err := os.Stat(b)
	require.NoError(t, err)
	return os.SameFile(fa, fb)
}

func TestPullCopyRunRelease(t *testing.T) {
	p := suite.PullFirst(t, map[string]string{"SECRET": "x", "https_proxy": "http://proxy:3128"}, "j42-build", false)
	g, f, ref, cred, img, logBuf := p.Reg, p.F, p.Ref, p.Cred, p.Img, p.Log
	ctx := context.Background()

	// ch-image pulled exactly the resolved digest; the credential went in
	// its environment only.
	name := g.Host + "/ci/tiny@" + mechtest.Digest1
	argv := f.Lines(t, "pull-argv")
	assert.Equal(t, []string{"--auth", "--tls-no-verify", "-s", f.Storage, "pull", name}, argv)
	secrets.AssertAbsent(t, "pull argv", argv...)
	env := f.Lines(t, "pull-env")
	assert.Contains(t, env, "CH_IMAGE_USERNAME=u")
	assert.Contains(t, env, "CH_IMAGE_PASSWORD="+userPassword)
	assert.Contains(t, env, "CH_IMAGE_STORAGE="+f.Storage)
	assert.Contains(t, env, "CH_IMAGE_CACHE=disabled")
	assert.Contains(t, env, "https_proxy=http://proxy:3128")
	assert.Contains(t, env, "PATH="+f.App+":"+toolPath)
	assert.NotContains(t, env, "SECRET=x")
	assert.Equal(t, []string{"/dev/null"}, f.Lines(t, "pull-stdin"), "ch-image's stdin is closed")

	stored := f.stored(ref, mechtest.Digest1)
	assert.Equal(t, filepath.Join(f.Storage, "img", strings.ReplaceAll(g.Host, ":", "+")+"%ci%tiny@sha256+"+strings.Repeat("1", 64)), stored)
	copyDir := f.jobCopy("j42-build")
	assert.Positive(t, img.PullTime)
	assert.Positive(t, img.ReadyTime)
	assert.GreaterOrEqual(t, img.ReadyTime, img.PullTime)
	assert.Equal(t, mechanism.Image{
		Ref: ref.Full, Handle: "ci-exec-job:j42-build", Format: FormatStorage, Digest: mechtest.Digest1,
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
	assert.Equal(t, mechtest.Digest1, f.Store(t).Tag(ref.Full))
	assert.Empty(t, f.Entries(t), "nothing converted")
	assert.Contains(t, logBuf.String(), "ch-image pull "+name)
	assert.Contains(t, logBuf.String(), "pulling image:    "+name)
	secrets.AssertAbsent(t, "job log", logBuf.String())

	info, err := f.r.Probe(ctx)
	require.NoError(t, err)
	argv, _, err = f.r.Command(mechanism.RunSpec{
		Info: info, Image: img, Binds: []policy.Bind{policy.SamePath("/builds/ci")}, Workdir: "/builds/ci",
		Env: []string{"USER=ciuser"}, Argv: []string{img.Shell, "/builds/scripts/step_script"},
	})
	require.NoError(t, err)
	assert.Equal(t, []string{filepath.Join(f.App, "ch-run"), "-s", f.Storage, "--bind=/builds/ci:/builds/ci", "--private-tmp", "--cd=/builds/ci",
		"--set-env", "ci-exec-job:j42-build", "--", "/bin/sh", "/builds/scripts/step_script"}, argv)

	// The next job: the registry is asked again (policy always), the
	// digest is unchanged, nothing is pulled; it gets its own copy.
	logBuf.Reset()
	img2, err := f.r.Pull(ctx, f.Request(ref, "j43-build", config.PullAlways, cred, logBuf))
	require.NoError(t, err)
	assert.Equal(t, 2, g.Resolved())
	assert.Equal(t, 1, f.Pulls(t), "a hit: ch-image not run again")
	assert.Equal(t, "hit", img2.Cache)
	assert.Zero(t, img2.PullTime)
	assert.Equal(t, mechtest.Digest1, img2.Digest)
	assert.Equal(t, "ci-exec-job:j43-build", img2.Handle)
	assert.Equal(t, []string{f.jobCopy("j43-build")}, img2.Private)
	assert.NotContains(t, logBuf.String(), "ch-image pull")
	assert.True(t, sameFile(t, filepath.Join(stored, "bin/busybox"), filepath.Join(f.jobCopy("j43-build"), "bin/busybox")))

	// Cleanup removes the job's copy only.
	require.NoError(t, f.r.Release(ctx, img, f.Jobs))
	assert.NoDirExists(t, copyDir)
	assert.FileExists(t, filepath.Join(stored, "bin/busybox"))
	assert.DirExists(t, f.jobCopy("j43-build"))
	require.NoError(t, f.r.Release(ctx, img, f.Jobs), "cleanup may run twice")
	require.NoError(t, f.r.Release(ctx, img2, f.Jobs))
	assert.NoDirExists(t, f.jobCopy("j43-build"))
	assert.Equal(t, []string{filepath.Base(stored)}, mechtest.Ls(t, filepath.Join(f.Storage, "img")))
}

// TestPullTagMoves: a tag pushed again is pulled anew with policy always;
// a job that started on the old digest keeps its image.
func TestPullTagMoves(t *testing.T) {
	g := mechtest.StartRegistry(t, suite.Scheme)
	f := newFake(t, config.Mechanism{}, nil)
	ref := g.Ref(t)
	ctx := context.Background()
	img1, err := f.r.Pull(ctx, f.Request(ref, "j1-first", config.PullAlways, auth.Credential{}, io.Discard))
	require.NoError(t, err)
	assert.Equal(t, []string{"--tls-no-verify", "-s", f.Storage, "pull", g.Host + "/ci/tiny@" + mechtest.Digest1}, f.Lines(t, "pull-argv"),
		"anonymous: no --auth")

	g.Set("ci/tiny:latest", mechtest.Digest2)
	img2, err := f.r.Pull(ctx, f.Request(ref, "j2-second", config.PullAlways, auth.Credential{}, io.Discard))
	require.NoError(t, err)
	assert.Equal(t, 2, f.Pulls(t))
	assert.Equal(t, g.Host+"/ci/tiny@"+mechtest.Digest2, f.Lines(t, "pull-argv")[4])
	assert.Equal(t, mechtest.Digest2, img2.Digest)
	assert.Equal(t, "miss", img2.Cache)
	assert.Equal(t, mechtest.Digest2, f.Store(t).Tag(ref.Full))
	assert.Equal(t, ref.FamiliarAtDigest(mechtest.Digest1)+"\n", mechtest.ReadString(t, filepath.Join(f.jobCopy("j1-first"), "etc/image-name")))
	assert.Equal(t, ref.FamiliarAtDigest(mechtest.Digest2)+"\n", mechtest.ReadString(t, filepath.Join(f.jobCopy("j2-second"), "etc/image-name")))
	assert.DirExists(t, f.stored(ref, mechtest.Digest1))
	assert.DirExists(t, f.stored(ref, mechtest.Digest2))
	require.NoError(t, f.r.Release(ctx, img1, f.Jobs))
	assert.DirExists(t, f.jobCopy("j2-second"))
}

// TestPullRetriedJob: prepare is retried with the same job key; the copy of
// the earlier attempt is replaced, not reused.
func TestPullRetriedJob(t *testing.T) {
	f := newFake(t, config.Mechanism{}, nil)
	ref := mechtest.ParsedRef(t, mechtest.ClosedPort(t)+"/ci/tiny@"+mechtest.Digest1)
	ctx := context.Background()
	_, err := f.r.Pull(ctx, f.Request(ref, "j42-build", config.PullAlways, auth.Credential{}, io.Discard))
	require.NoError(t, err)
	makeTree(t, f.jobCopy("j42-build"), []entry{file("stale", "from the first attempt", 0o644)})
	img, err := f.r.Pull(ctx, f.Request(ref, "j42-build", config.PullAlways, auth.Credential{}, io.Discard))
	require.NoError(t, err)
	assert.Equal(t, 1, f.Pulls(t))
	assert.NoFileExists(t, filepath.Join(f.jobCopy("j42-build"), "stale"))
	assert.DirExists(t, filepath.Join(f.jobCopy("j42-build"), "builds/ci"))
	assert.Equal(t, "/bin/sh", img.Shell)
}

// TestPullPinnedDigest: a reference with a digest needs no registry (the
// registry here is down) and is pulled as it is.
func TestPullPinnedDigest(t *testing.T) {
	f, ref, img := suite.PullPinned(t, mechtest.Digest2, "j42-build", func(req *mechanism.PullRequest) { req.Insecure = false })
	assert.Equal(t, []string{"-s", f.Storage, "pull", ref.Familiar}, f.Lines(t, "pull-argv"))
	assert.DirExists(t, f.stored(ref, mechtest.Digest2))
	assert.Equal(t, "ci-exec-job:j42-build", img.Handle)
}

func TestPullIfNotPresent(t *testing.T) { suite.PullIfNotPresent(t) }

// TestPullNever: the shared cases (mechtest.Suite.PullNever), an image dir
// that a killed pull left and a single-file job refused without a
// conversion.
func TestPullNever(t *testing.T) {
	suite.PullNever(t, mechtest.NeverCase[*fakeCharliecloud]{
		Name: "image dir without ch/, as a killed pull may leave",
		Setup: func(t *testing.T, f *fakeCharliecloud, ref policy.Ref) {
			require.NoError(t, f.Store(t).SetTag(ref.Full, mechtest.Digest1))
			makeTree(t, f.stored(ref, mechtest.Digest1), []entry{file("bin/sh", "#!", 0o755)})
		},
	})
	t.Run("absent, single file", func(t *testing.T) {
		g := mechtest.StartRegistry(t, suite.Scheme)
		f := newFake(t, config.Mechanism{}, nil)
		_, err := f.r.Pull(context.Background(), f.squashRequest(g.Ref(t), "j42-build", config.PullNever, auth.Credential{}, io.Discard))
		require.Error(t, err)
		assert.Equal(t, failure.User, failure.ClassOf(err), err.Error())
		assert.Zero(t, g.Resolved())
		assert.Zero(t, f.Pulls(t))
		assert.Zero(t, f.converts(t))
		assert.NoDirExists(t, f.mnt("j42-build"))
		f.AssertStoreClean(t)
	})
}

func TestPullSingleFile(t *testing.T) {
	p := suite.PullFirst(t, map[string]string{"https_proxy": "http://proxy:3128"}, "j42-build", true)
	g, f, ref, cred, img, logBuf := p.Reg, p.F, p.Ref, p.Cred, p.Img, p.Log
	ctx := context.Background()
	assert.Equal(t, 1, f.converts(t))
	assert.Equal(t, []string{"--auth", "--tls-no-verify", "-s", f.Storage, "pull", g.Host + "/ci/tiny@" + mechtest.Digest1}, f.Lines(t, "pull-argv"))

	// ch-convert squashed a copy of the stored image with the mount points
	// inside, from a build dir of the store, without any credential.
	st := f.Store(t)
	key := squashKey(mechtest.Digest1, testMounts)
	entry := st.Path(key)
	cargv := f.Lines(t, "convert-argv")
	require.Len(t, cargv, 6, cargv)
	assert.Equal(t, []string{"-i", "dir", "-o", "squash"}, cargv[:4])
	assert.Equal(t, cargv[5]+".d", cargv[4], "the image dir is next to the output")
	assert.Equal(t, filepath.Join(f.StoreRoot(), "tmp"), filepath.Dir(cargv[5]))
	assert.True(t, strings.HasPrefix(filepath.Base(cargv[5]), key+"."), cargv[5])
	tree := f.Lines(t, "convert-tree")
	for _, p := range []string{"./bin/sh", "./bin/busybox", "./ch/environment", "./builds/ci", "./scratch/data"} {
		assert.Contains(t, tree, p)
	}
	cenv := f.Lines(t, "convert-env")
	assert.Contains(t, cenv, "CH_IMAGE_STORAGE="+f.Storage)
	for _, kv := range cenv {
		assert.False(t, strings.HasPrefix(kv, "CH_IMAGE_USERNAME="), kv)
		assert.False(t, strings.HasPrefix(kv, "CH_IMAGE_PASSWORD="), kv)
	}
	secrets.AssertAbsent(t, "convert argv and env", append(cargv, cenv...)...)
	assert.Equal(t, []string{"/dev/null"}, f.Lines(t, "convert-stdin"))

	mnt := f.mnt("j42-build")
	assert.Positive(t, img.PullTime)
	assert.Positive(t, img.ConvertTime)
	assert.Positive(t, img.ReadyTime)
	assert.NotEmpty(t, img.Lease)
	assert.Equal(t, mechanism.Image{
		Ref: ref.Full, Handle: entry, Format: FormatSquash, Digest: mechtest.Digest1, Shell: "/bin/sh",
		RunOptions: []string{"--mount=" + mnt, "--set-env"}, Private: []string{mnt}, Lease: img.Lease,
		Cache: "miss", PullTime: img.PullTime, ConvertTime: img.ConvertTime, ReadyTime: img.ReadyTime,
	}, img)
	assert.Equal(t, filepath.Join(f.StoreRoot(), "refs", key, "j42-build"), img.Lease)
	assert.FileExists(t, img.Lease)
	assert.DirExists(t, mnt)
	assert.Equal(t, string(sqfsHeader())+strings.Join(tree, "\n")+"\n", mechtest.ReadString(t, entry), "the entry is what ch-convert wrote")
	assert.Equal(t, "/bin/sh", st.Meta(key, "shell"))
	assert.Equal(t, "yes", st.Meta(key, "setenv"))
	assert.Equal(t, []string{key}, f.Entries(t))
	assert.Empty(t, mechtest.Ls(t, filepath.Join(f.StoreRoot(), "tmp")), "the build dir is gone")
	assert.NoDirExists(t, f.jobCopy("j42-build"), "no per-job copy in the storage")
	assert.NoDirExists(t, filepath.Join(f.stored(ref, mechtest.Digest1), "builds"), "the stored image is not changed")
	assert.Equal(t, mechtest.Digest1, st.Tag(ref.Full))
	assert.Contains(t, logBuf.String(), "ch-convert "+ref.Full+" to SquashFS")
	secrets.AssertAbsent(t, "job log", logBuf.String())

	info, err := f.r.Probe(ctx)
	require.NoError(t, err)
	argv, _, err := f.r.Command(mechanism.RunSpec{
		Info: info, Image: img, Binds: []policy.Bind{policy.SamePath("/builds/ci")}, Workdir: "/builds/ci",
		Env: []string{"USER=ciuser"}, Argv: []string{img.Shell, "/builds/scripts/step_script"},
	})
	require.NoError(t, err)
	assert.Equal(t, []string{filepath.Join(f.App, "ch-run"), "--bind=/builds/ci:/builds/ci", "--private-tmp", "--cd=/builds/ci",
		"--mount=" + mnt, "--set-env", entry, "--", "/bin/sh", "/builds/scripts/step_script"}, argv)

	// The next job with the same mount points: a hit, neither pulled nor
	// converted; its own lease and mount dir.
	img2, err := f.r.Pull(ctx, f.squashRequest(ref, "j43-build", config.PullAlways, cred, io.Discard))
	require.NoError(t, err)
	assert.Equal(t, 2, g.Resolved())
	assert.Equal(t, 1, f.Pulls(t))
	assert.Equal(t, 1, f.converts(t))
	assert.Equal(t, "hit", img2.Cache)
	assert.Zero(t, img2.PullTime)
	assert.Zero(t, img2.ConvertTime)
	assert.Equal(t, entry, img2.Handle)
	assert.Equal(t, []string{"--mount=" + f.mnt("j43-build"), "--set-env"}, img2.RunOptions)
	assert.Equal(t, []string{f.mnt("j43-build")}, img2.Private)
	assert.Equal(t, filepath.Join(f.StoreRoot(), "refs", key, "j43-build"), img2.Lease)

	// Cleanup ends the job's lease and removes its mount dir; the entry
	// stays for the next job.
	require.NoError(t, f.r.Release(ctx, img, f.Jobs))
	assert.NoFileExists(t, img.Lease)
	assert.NoDirExists(t, mnt)
	assert.FileExists(t, entry)
	assert.FileExists(t, img2.Lease)
	assert.DirExists(t, f.mnt("j43-build"))
	require.NoError(t, f.r.Release(ctx, img, f.Jobs), "cleanup may run twice")
	require.NoError(t, f.r.Release(ctx, img2, f.Jobs))
	assert.Empty(t, mechtest.Ls(t, filepath.Join(f.StoreRoot(), "refs")))
	assert.FileExists(t, entry)
}

// TestPullSingleFileMountSets: the mount points are part of the entry's
// key. Another set is converted again (from the stored image, not pulled
// again); the first entry is not changed.
func TestPullSingleFileMountSets(t *testing.T) {
	f := newFake(t, config.Mechanism{}, nil)
	ref := mechtest.ParsedRef(t, mechtest.ClosedPort(t)+"/ci/tiny@"+mechtest.Digest1)
	ctx := context.Background()
	img1, err := f.r.Pull(ctx, f.squashRequest(ref, "j1-first", config.PullAlways, auth.Credential{}, io.Discard))
	require.NoError(t, err)
	before := mechtest.ReadString(t, img1.Handle)

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
	assert.Equal(t, 1, f.Pulls(t), "the stored image is converted again, not pulled again")
	assert.Equal(t, 2, f.converts(t))
	assert.Equal(t, "miss", img3.Cache)
	assert.Zero(t, img3.PullTime)
	assert.Positive(t, img3.ConvertTime)
	assert.NotEqual(t, img1.Handle, img3.Handle)
	assert.Equal(t, f.Store(t).Path(squashKey(mechtest.Digest1, req.MountPoints)), img3.Handle)
	tree := f.Lines(t, "convert-tree")
	assert.Contains(t, tree, "./other/volume")
	assert.NotContains(t, tree, "./scratch/data")
	assert.Equal(t, before, mechtest.ReadString(t, img1.Handle))
	assert.ElementsMatch(t, []string{filepath.Base(img1.Handle), filepath.Base(img3.Handle)}, f.Entries(t))
	assert.NoDirExists(t, filepath.Join(f.stored(ref, mechtest.Digest1), "other"))
}

// TestPullSingleFileWithoutEnvironment: an image without ENV settings is
// run without --set-env, also when the entry is found later.
func TestPullSingleFileWithoutEnvironment(t *testing.T) {
	f := newFake(t, config.Mechanism{}, nil)
	f.Set(t, "no-env", "")
	f.Set(t, "pull-hook", `rm "$d/bin/sh"; printf '#!' > "$d/bin/bash"; chmod 755 "$d/bin/bash"`+"\n")
	ref := mechtest.ParsedRef(t, mechtest.ClosedPort(t)+"/ci/tiny@"+mechtest.Digest1)
	ctx := context.Background()
	img, err := f.r.Pull(ctx, f.squashRequest(ref, "j1-first", config.PullAlways, auth.Credential{}, io.Discard))
	require.NoError(t, err)
	key := squashKey(mechtest.Digest1, testMounts)
	assert.Equal(t, "no", f.Store(t).Meta(key, "setenv"))
	assert.Equal(t, "/bin/bash", f.Store(t).Meta(key, "shell"))
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
	ref := mechtest.ParsedRef(t, mechtest.ClosedPort(t)+"/ci/tiny@"+mechtest.Digest1)
	ctx := context.Background()
	_, err := f.r.Pull(ctx, f.squashRequest(ref, "j1-first", config.PullAlways, auth.Credential{}, io.Discard))
	require.NoError(t, err)
	require.NoError(t, os.Remove(f.Store(t).Path(squashKey(mechtest.Digest1, testMounts))+".meta"))
	_, err = f.r.Pull(ctx, f.squashRequest(ref, "j2-second", config.PullAlways, auth.Credential{}, io.Discard))
	require.Error(t, err)
	assert.Equal(t, failure.System, failure.ClassOf(err))
	assert.Contains(t, err.Error(), "no recorded shell")
	assert.NoFileExists(t, filepath.Join(f.StoreRoot(), "refs", squashKey(mechtest.Digest1, testMounts), "j2-second"))
}

// TestPullSingleFileDamagedEntry: a truncated entry is rebuilt.
func TestPullSingleFileDamagedEntry(t *testing.T) {
	f := newFake(t, config.Mechanism{}, nil)
	ref := mechtest.ParsedRef(t, mechtest.ClosedPort(t)+"/ci/tiny@"+mechtest.Digest1)
	ctx := context.Background()
	img, err := f.r.Pull(ctx, f.squashRequest(ref, "j1-first", config.PullAlways, auth.Credential{}, io.Discard))
	require.NoError(t, err)
	require.NoError(t, os.Truncate(img.Handle, 50))
	img, err = f.r.Pull(ctx, f.squashRequest(ref, "j2-second", config.PullAlways, auth.Credential{}, io.Discard))
	require.NoError(t, err)
	assert.Equal(t, "miss", img.Cache)
	assert.Equal(t, 2, f.converts(t))
	assert.Equal(t, 1, f.Pulls(t))
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
			g := mechtest.StartRegistry(t, suite.Scheme)
			f := newFake(t, config.Mechanism{}, nil)
			ref := g.Ref(t)
			ctx := context.Background()
			_, err := f.r.Pull(ctx, f.Request(ref, "j1-first", config.PullAlways, auth.Credential{}, io.Discard))
			require.NoError(t, err)
			g.Set("ci/tiny:latest", mechtest.Digest2)
			img, err := f.r.Pull(ctx, f.squashRequest(ref, "j2-second", policy, auth.Credential{}, io.Discard))
			require.NoError(t, err)
			assert.Equal(t, 1, g.Resolved(), "the tag record is used")
			assert.Equal(t, 1, f.Pulls(t))
			assert.Equal(t, 1, f.converts(t))
			assert.Equal(t, mechtest.Digest1, img.Digest)
		})
	}
}

// TestConcurrentJobsPullOnce: jobs of the same user that need the same
// image at once run ch-image once, and ch-convert once for single files.
func TestConcurrentJobsPullOnce(t *testing.T) {
	t.Run("copy", func(t *testing.T) {
		f, _ := suite.ConcurrentJobsPullOnce(t, false, nil, nil)
		assert.Zero(t, f.converts(t))
	})
	t.Run("single file", func(t *testing.T) {
		waited := "hit after waiting (another job built it)"
		f, imgs := suite.ConcurrentJobsPullOnce(t, true, nil, []string{"miss", waited, waited})
		for _, img := range imgs {
			assert.Equal(t, "/bin/sh", img.Shell)
		}
		assert.Equal(t, 1, f.converts(t), "converted once")
		assert.Equal(t, imgs[0].Handle, imgs[1].Handle)
		assert.Len(t, mechtest.Ls(t, filepath.Join(f.StoreRoot(), "refs", squashKey(mechtest.Digest1, testMounts))), 3, "three leases")
	})
}

func TestPullCredentials(t *testing.T) {
	t.Run("job token", func(t *testing.T) {
		suite.PullWithJobToken(t, func(t *testing.T, f *fakeCharliecloud) {
			secrets.AssertAbsent(t, "convert argv and env", append(f.Lines(t, "convert-argv"), f.Lines(t, "convert-env")...)...)
		})
	})
	t.Run("anonymous", func(t *testing.T) {
		suite.PullAnonymously(t, map[string]string{"CH_IMAGE_PASSWORD": "host-password"}, func(t *testing.T, f *fakeCharliecloud) {
			assert.NotContains(t, f.Lines(t, "pull-argv"), "--auth")
		})
	})
}

// TestPullFailures: ch-image or the image fails, with and without a
// single file. The references are pinned, so no registry is involved.
func TestPullFailures(t *testing.T) {
	pullFails := func(msg string) func(t *testing.T, f *fakeCharliecloud) {
		return func(t *testing.T, f *fakeCharliecloud) { f.Set(t, "pull-fail", msg) }
	}
	hook := func(code string) func(t *testing.T, f *fakeCharliecloud) {
		return func(t *testing.T, f *fakeCharliecloud) { f.Set(t, "pull-hook", code+"\n") }
	}
	anonymous := mechtest.Anonymous
	tests := suite.RegistryFailures("error: no further authentication possible, giving up\n",
		"error: unauthorized or not in registry: 127.0.0.1:5443/ci/tiny\n")
	tests = append(tests, []mechtest.PullFailure[*fakeCharliecloud]{
		{Name: "unknown error", Setup: pullFails("error: something new\n"),
			Cred: anonymous, Class: failure.System, WantErr: "ch-image failed: error: something new"},
		{Name: "exit 0 without an image", Setup: func(t *testing.T, f *fakeCharliecloud) { f.Set(t, "pull-nowrite", "") },
			Cred: anonymous, Class: failure.System, WantErr: "succeeded but the image is not in the storage"},
		{Name: "image without a shell", Setup: hook(`rm "$d/bin/sh" "$d/bin/busybox"`),
			Cred: anonymous, Class: failure.User, WantErr: "neither bash nor sh"},
		{Name: "mount point through a symlink", Setup: hook(`mkdir -p "$OUTSIDE"; ln -s "$OUTSIDE" "$d/scratch"`),
			Cred: anonymous, Class: failure.User, WantErr: "symlink at /scratch"},
		{Name: "mount point blocked by a file", Setup: hook(`touch "$d/scratch"`),
			Cred: anonymous, Class: failure.System, WantErr: "in the way"},
		{Name: "no ch-image", Setup: func(t *testing.T, f *fakeCharliecloud) {
			require.NoError(t, os.Remove(filepath.Join(f.App, "ch-image")))
		}, Cred: anonymous, Class: failure.System, WantErr: "ch-image not found"},
		{Name: "storage is a symlink", Setup: func(t *testing.T, f *fakeCharliecloud) {
			elsewhere := filepath.Join(filepath.Dir(f.Images), "elsewhere")
			require.NoError(t, os.Mkdir(elsewhere, 0o700))
			require.NoError(t, os.Symlink(elsewhere, f.Storage))
		}, Cred: anonymous, Class: failure.System, WantErr: "not a directory"},
	}...)
	suite.PullFailures(t, tests, []bool{false, true}, func(t *testing.T, f *fakeCharliecloud, _ mechtest.PullFailure[*fakeCharliecloud], ref policy.Ref, key string) {
		assert.NoDirExists(t, f.jobCopy(key), "no job copy left behind")
		assert.NoDirExists(t, f.mnt(key), "no mount dir left behind")
		assert.NoDirExists(t, filepath.Join(filepath.Dir(f.Storage), "outside", "data"), "nothing created outside the image")
		assert.NoFileExists(t, f.TagRecord(ref), "no tag record for a failed pull")
		assert.Zero(t, f.converts(t), "nothing converted")
		f.AssertStoreClean(t)
	})
}

// TestConvertFailures: ch-convert is missing or fails.
func TestConvertFailures(t *testing.T) {
	tests := []struct {
		name    string
		setup   func(t *testing.T, f *fakeCharliecloud)
		wantErr string
	}{
		{"no ch-convert", func(t *testing.T, f *fakeCharliecloud) {
			require.NoError(t, os.Remove(filepath.Join(f.App, "ch-convert")))
		}, "ch-convert not found"},
		{"ch-convert fails", func(t *testing.T, f *fakeCharliecloud) {
			f.Set(t, "convert-fail", "ch-convert[1]: error: mksquashfs failed\n")
		}, "ch-convert[1]: error: mksquashfs failed"},
		{"ch-convert writes no SquashFS", func(t *testing.T, f *fakeCharliecloud) { f.Set(t, "convert-garbage", "") },
			"not a SquashFS file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFake(t, config.Mechanism{}, nil)
			tt.setup(t, f)
			ref := mechtest.ParsedRef(t, "127.0.0.1:5443/ci/tiny@"+mechtest.Digest1)
			_, err := f.r.Pull(context.Background(), f.squashRequest(ref, "j42-build", config.PullAlways, auth.Credential{}, io.Discard))
			require.Error(t, err)
			assert.Equal(t, failure.System, failure.ClassOf(err), err.Error())
			assert.Contains(t, err.Error(), tt.wantErr)
			assert.NoDirExists(t, f.mnt("j42-build"))
			assert.NoFileExists(t, f.TagRecord(ref))
			f.AssertStoreClean(t)
		})
	}
}

func TestPullResolveFailures(t *testing.T) { suite.PullResolveFailures(t) }

func TestFailedPullKeepsTheStoredImage(t *testing.T) { suite.FailedPullKeepsTheStoredImage(t) }

// TestConvertTmpDir: tmp_dir gives ch-convert a per-user scratch dir.
func TestConvertTmpDir(t *testing.T) {
	shared := t.TempDir()
	require.NoError(t, os.Chmod(shared, 0o1777))
	f := newFake(t, config.Mechanism{TmpDir: shared}, nil)
	ref := mechtest.ParsedRef(t, "127.0.0.1:5443/ci/tiny@"+mechtest.Digest1)
	_, err := f.r.Pull(context.Background(), f.squashRequest(ref, "j42-build", config.PullAlways, auth.Credential{}, io.Discard))
	require.NoError(t, err)
	argv := f.Lines(t, "convert-argv")
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
		assert.Empty(t, mechtest.Ls(t, elsewhere))
		f.AssertStoreClean(t)
	})
}

// TestPullGPU: a GPU job gets an image directory of its own (never hard
// links to the stored image, which ch-fromhost would change) and
// ch-fromhost --nvidia runs on exactly that copy. No GPU is on the
// machines this runs on: fakes stand in for ch-fromhost and
// nvidia-container-cli, and the argv is what is checked.
func TestPullGPU(t *testing.T) {
	g := mechtest.StartRegistry(t, suite.Scheme)
	f := newFake(t, config.Mechanism{}, nil)
	f.Install(t, "ch-fromhost", "#!/bin/sh\nprintf '%s\\n' \"$@\" > @RECORD@/fromhost-argv\n")
	f.Install(t, "nvidia-container-cli", "#!/bin/sh\nexit 0\n")
	ref := g.Ref(t)
	ctx := context.Background()
	req := f.Request(ref, "j7-gpu", config.PullAlways, auth.Credential{}, io.Discard)
	req.GPU = true
	img, err := f.r.Pull(ctx, req)
	require.NoError(t, err)
	assert.Equal(t, FormatDir, img.Format, "a copy of its own")
	assert.Equal(t, []string{"--nvidia", img.Handle}, f.Lines(t, "fromhost-argv"))
	assert.Equal(t, []string{filepath.Join(f.App, "ch-fromhost"), "--nvidia", "/x"}, fromhostArgv(mechanism.Info{Programs: map[string]string{"ch-fromhost": filepath.Join(f.App, "ch-fromhost")}}, "/x"))
	require.NoError(t, f.r.Release(ctx, img, f.Jobs))

	req.SingleFile = true
	_, err = f.r.Pull(ctx, req)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "a GPU job needs its own image directory")
}

// TestPullGPUMissingTools: without nvidia-container-cli a GPU job fails
// as a system failure that names what to install.
func TestPullGPUMissingTools(t *testing.T) {
	g := mechtest.StartRegistry(t, suite.Scheme)
	f := newFake(t, config.Mechanism{}, nil)
	f.Install(t, "ch-fromhost", "#!/bin/sh\nexit 0\n")
	req := f.Request(g.Ref(t), "j8-gpu", config.PullAlways, auth.Credential{}, io.Discard)
	req.GPU = true
	_, err := f.r.Pull(context.Background(), req)
	require.Error(t, err)
	assert.Equal(t, failure.System, failure.ClassOf(err))
	assert.Contains(t, err.Error(), "needs ch-fromhost and nvidia-container-cli")
}
