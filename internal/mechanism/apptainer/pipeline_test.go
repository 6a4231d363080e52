package apptainer

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/mechanism/kit"
	"github.com/ci-exec/ci-exec/internal/mechanism/mechtest"
	"github.com/ci-exec/ci-exec/internal/policy"
	"github.com/ci-exec/ci-exec/internal/testenv"
)

// These tests run Pull and Release against the fake apptainer of
// helpers_test.go and, where a tag must be resolved, a fake registry on
// the loopback interface: no Apptainer, root or network needed.

// sifs are what the fake's pulls of each digest hold in the shared
// scenarios (the tag moves from Digest1 to Digest2), and the shell the
// probe finds in them.
var sifs = map[string]struct{ text, shell string }{
	mechtest.Digest1: {"SIF image with bash\n", "/bin/bash"},
	mechtest.Digest2: {"a newer SIF\n", "/bin/sh"},
}

// suite is the pull scenarios Apptainer shares with Charliecloud (package
// mechtest), with what Apptainer checks of its own: every job runs the
// SIF of the store under a lease.
var suite = mechtest.Suite[*fakeApptainer]{
	Install:   installFake,
	Scheme:    mechtest.PlainHTTP,
	Creds:     creds,
	Password:  alicePass,
	Token:     tokenValue,
	Secrets:   secrets,
	Tool:      "apptainer pull",
	Image:     "SIF",
	NotListed: mechtest.Failure{Name: "plain HTTP, not listed", WantErr: "insecure_registries"},
	Refused:   tailRefused,

	Got: func(t *testing.T, f *fakeApptainer, _ policy.Ref, img mechanism.Image, key, digest string) {
		t.Helper()
		assert.Equal(t, f.storedSIF(digest), img.Handle)
		assert.Equal(t, f.lease(digest, key), img.Lease)
		assert.Equal(t, sifs[digest].shell, img.Shell)
		assert.Equal(t, sifs[digest].text, sifText(t, img.Handle))
	},
	Retag: func(t *testing.T, f *fakeApptainer) { f.setImage(t, sifs[mechtest.Digest2].text) },
	Remove: func(t *testing.T, f *fakeApptainer, _ policy.Ref, digest string) {
		require.NoError(t, os.Remove(f.storedSIF(digest)))
	},
	Kept: func(t *testing.T, f *fakeApptainer, _ policy.Ref, key string) {
		assert.Equal(t, []string{sifKey(mechtest.Digest1)}, f.Entries(t))
		assert.Equal(t, sifs[mechtest.Digest1].text, sifText(t, f.storedSIF(mechtest.Digest1)))
		assert.NoFileExists(t, f.lease(mechtest.Digest2, key))
	},
	Untouched: func(t *testing.T, f *fakeApptainer, _ string) {
		assert.Zero(t, f.execs(t), "nothing run")
		assert.Empty(t, mechtest.Ls(t, filepath.Join(f.StoreRoot(), "refs")), "no lease")
	},
}

func TestPullAlways(t *testing.T) {
	t.Setenv("APPTAINER_BIND", "/etc:/mnt")
	t.Setenv("SINGULARITY_BIND", "/etc:/mnt")
	p := suite.PullFirst(t, hostileHostEnv, jobKey, false)
	g, f, ref, cred, img, logBuf := p.Reg, p.F, p.Ref, p.Cred, p.Img, p.Log
	ctx := context.Background()

	// apptainer pulled exactly the resolved digest, into a temporary name
	// in the store, published when complete.
	stored := f.storedSIF(mechtest.Digest1)
	argv := f.Lines(t, "pull-argv")
	require.Len(t, argv, 5, argv)
	assert.Equal(t, []string{"pull", "--force", "--no-https"}, argv[:3])
	assert.Equal(t, "docker://"+g.Host+"/ci/tiny@"+mechtest.Digest1, argv[4])
	assert.Equal(t, filepath.Join(f.StoreRoot(), "tmp"), filepath.Dir(argv[3]))
	assert.True(t, strings.HasPrefix(filepath.Base(argv[3]), sifKey(mechtest.Digest1)+"."), argv[3])
	assert.NoFileExists(t, argv[3])
	assert.Equal(t, []string{sifKey(mechtest.Digest1)}, f.Entries(t), "only the stored SIF")
	assert.Empty(t, mechtest.Ls(t, filepath.Join(f.StoreRoot(), "tmp")))
	assert.Equal(t, "SIF image with bash\n", sifText(t, stored))
	assert.Equal(t, mechtest.Digest1, f.Store(t).Tag(ref.Full))
	secrets.AssertAbsent(t, "pull argv", argv...)

	// Credentials and settings only through the environment.
	env := f.RecordedEnv(t, "pull-env")
	assert.ElementsMatch(t, f.rt.toolEnv(cred), env)
	assert.Contains(t, env, "APPTAINER_DOCKER_USERNAME=alice")
	assert.Contains(t, env, "APPTAINER_DOCKER_PASSWORD="+alicePass)
	assert.Contains(t, env, "APPTAINER_CACHEDIR="+filepath.Join(f.Storage, "cache"))
	assert.Contains(t, env, "APPTAINER_TMPDIR="+filepath.Join(f.Storage, "tmp"))
	assert.Contains(t, env, "https_proxy=http://proxy:3128")
	assert.Contains(t, env, "PATH="+f.App+":"+toolPath)
	for _, kv := range env {
		assert.False(t, strings.HasPrefix(kv, "APPTAINER_BIND="), kv)
		assert.False(t, strings.HasPrefix(kv, "SINGULARITY"), kv)
		assert.False(t, strings.HasPrefix(kv, "LD_PRELOAD="), kv)
		assert.NotEqual(t, "APPTAINER_DOCKER_PASSWORD=host-password", kv)
	}
	assert.Equal(t, []string{"/dev/null"}, f.Lines(t, "pull-stdin"))

	// The shell was looked for in the stored SIF, without credentials, and
	// recorded with it.
	assert.Equal(t, []string{"exec", "--cleanenv", stored, "/bin/sh", "-c", kit.ShellProbe}, f.Lines(t, "exec-argv"))
	assert.ElementsMatch(t, []string{"PATH=" + f.App + ":" + toolPath, "HOME=/home/ciuser", "USER=ciuser", "LOGNAME=ciuser", "LANG=C.UTF-8"},
		f.RecordedEnv(t, "exec-env"))
	assert.Equal(t, "/bin/bash", f.Store(t).Meta(sifKey(mechtest.Digest1), "shell"))

	// The job runs the stored SIF under a lease.
	assert.Positive(t, img.PullTime)
	assert.Positive(t, img.ReadyTime)
	assert.Equal(t, mechanism.Image{Ref: ref.Full, Handle: stored, Format: FormatSIF, Digest: mechtest.Digest1, Shell: "/bin/bash",
		Lease: f.lease(mechtest.Digest1, jobKey), Cache: "miss", PullTime: img.PullTime, ReadyTime: img.ReadyTime}, img)
	assert.FileExists(t, img.Lease)
	assert.Empty(t, mechtest.Ls(t, f.Jobs), "nothing per-job in the scripts dir")
	assert.Contains(t, logBuf.String(), "apptainer pull "+ref.AtDigest(mechtest.Digest1))
	assert.Contains(t, logBuf.String(), "Converting OCI blobs to SIF format")
	secrets.AssertAbsent(t, "job log", logBuf.String())

	// Same digest for the next job: resolved again, neither pulled nor run
	// again (the shell is recorded).
	logBuf.Reset()
	img2, err := f.rt.Pull(ctx, f.Request(ref, "j43-def", config.PullAlways, cred, logBuf))
	require.NoError(t, err)
	assert.Equal(t, 2, g.Resolved())
	assert.Equal(t, 1, f.Pulls(t))
	assert.Equal(t, 1, f.execs(t))
	assert.NotContains(t, logBuf.String(), "apptainer pull")
	assert.Equal(t, mechanism.Image{Ref: ref.Full, Handle: stored, Format: FormatSIF, Digest: mechtest.Digest1, Shell: "/bin/bash",
		Lease: f.lease(mechtest.Digest1, "j43-def"), Cache: "hit", ReadyTime: img2.ReadyTime}, img2)

	// The tag moves: the next job pulls the new image; the first ones keep
	// theirs.
	g.Set("ci/tiny:latest", mechtest.Digest2)
	f.setImage(t, "SIF v2 with sh only\n")
	img3, err := f.rt.Pull(ctx, f.Request(ref, "j44-ghi", config.PullAlways, cred, io.Discard))
	require.NoError(t, err)
	assert.Equal(t, 2, f.Pulls(t))
	assert.Equal(t, mechtest.Digest2, img3.Digest)
	assert.Equal(t, "miss", img3.Cache)
	assert.Equal(t, "/bin/sh", img3.Shell)
	assert.Equal(t, f.storedSIF(mechtest.Digest2), img3.Handle)
	assert.Equal(t, "SIF image with bash\n", sifText(t, stored))
	assert.Equal(t, "SIF v2 with sh only\n", sifText(t, img3.Handle))
	assert.Equal(t, mechtest.Digest2, f.Store(t).Tag(ref.Full))
	assert.ElementsMatch(t, []string{sifKey(mechtest.Digest1), sifKey(mechtest.Digest2)}, f.Entries(t))

	// Cleanup ends the job's lease only.
	require.NoError(t, f.rt.Release(ctx, img, f.Jobs))
	assert.NoFileExists(t, img.Lease)
	assert.FileExists(t, img2.Lease)
	assert.FileExists(t, img3.Lease)
	assert.FileExists(t, stored)
	require.NoError(t, f.rt.Release(ctx, img, f.Jobs), "cleanup may run twice")
	require.NoError(t, f.rt.Release(ctx, img2, f.Jobs))
	require.NoError(t, f.rt.Release(ctx, img3, f.Jobs))
	assert.Empty(t, mechtest.Ls(t, filepath.Join(f.StoreRoot(), "refs")))
	assert.ElementsMatch(t, []string{sifKey(mechtest.Digest1), sifKey(mechtest.Digest2)}, f.Entries(t))
}

func TestPullVariants(t *testing.T) {
	t.Run("job token", func(t *testing.T) {
		suite.PullWithJobToken(t, func(t *testing.T, f *fakeApptainer) {
			secrets.AssertAbsent(t, "exec env", f.Lines(t, "exec-env")...)
		})
	})
	t.Run("anonymous has no credential variables", func(t *testing.T) {
		suite.PullAnonymously(t, hostileHostEnv, func(t *testing.T, f *fakeApptainer) {
			for _, kv := range f.RecordedEnv(t, "pull-env") {
				assert.False(t, strings.HasPrefix(kv, "APPTAINER_DOCKER_"), kv)
			}
		})
	})
	t.Run("pinned digest: no registry request, no --no-https unless listed", func(t *testing.T) {
		f, ref, img := suite.PullPinned(t, mechtest.Digest1, jobKey, func(req *mechanism.PullRequest) { req.Insecure = false })
		assert.Equal(t, []string{"pull", "--force"}, f.Lines(t, "pull-argv")[:2])
		assert.Equal(t, "docker://"+ref.Full, f.Lines(t, "pull-argv")[3])
		assert.Equal(t, f.storedSIF(mechtest.Digest1), img.Handle)
	})
	t.Run("single file: the SIF as it is", func(t *testing.T) {
		f, _, img := suite.PullPinned(t, mechtest.Digest1, jobKey, func(req *mechanism.PullRequest) { req.SingleFile = true })
		assert.Equal(t, FormatSIF, img.Format)
		assert.Equal(t, f.storedSIF(mechtest.Digest1), img.Handle)
		assert.Empty(t, img.RunOptions)
		assert.Empty(t, img.Private)
		assert.Zero(t, img.ConvertTime)
		assert.Equal(t, 1, f.Pulls(t))
		assert.Equal(t, []string{sifKey(mechtest.Digest1)}, f.Entries(t))
	})
	t.Run("cache_dir and tmp_dir", func(t *testing.T) {
		shared := t.TempDir()
		cache, tmp := filepath.Join(shared, "cache"), filepath.Join(shared, "tmp")
		require.NoError(t, os.Mkdir(cache, 0o1777))
		require.NoError(t, os.Mkdir(tmp, 0o1777))
		f := installFake(t, config.Mechanism{CacheDir: cache, TmpDir: tmp}, nil)
		ref := mechtest.ParsedRef(t, "127.0.0.1:5443/ci/tiny@"+mechtest.Digest1)
		_, err := f.rt.Pull(context.Background(), f.Request(ref, jobKey, config.PullAlways, auth.Credential{}, io.Discard))
		require.NoError(t, err)
		env := f.RecordedEnv(t, "pull-env")
		assert.Contains(t, env, "APPTAINER_CACHEDIR="+filepath.Join(cache, jobUser))
		assert.Contains(t, env, "APPTAINER_TMPDIR="+filepath.Join(tmp, jobUser))
		assert.DirExists(t, filepath.Join(cache, jobUser))
		assert.DirExists(t, filepath.Join(tmp, jobUser))
	})
	t.Run("retried prepare: the same lease", func(t *testing.T) {
		f := installFake(t, config.Mechanism{}, nil)
		ref := mechtest.ParsedRef(t, "127.0.0.1:5443/ci/tiny@"+mechtest.Digest1)
		img1, err := f.rt.Pull(context.Background(), f.Request(ref, jobKey, config.PullAlways, auth.Credential{}, io.Discard))
		require.NoError(t, err)
		img2, err := f.rt.Pull(context.Background(), f.Request(ref, jobKey, config.PullAlways, auth.Credential{}, io.Discard))
		require.NoError(t, err)
		assert.Equal(t, img1.Lease, img2.Lease)
		assert.Equal(t, 1, f.Pulls(t))
		require.NoError(t, f.rt.Release(context.Background(), img2, f.Jobs))
		assert.Empty(t, mechtest.Ls(t, filepath.Join(f.StoreRoot(), "refs")))
	})
	t.Run("damaged stored SIF: pulled again", func(t *testing.T) {
		f := installFake(t, config.Mechanism{}, nil)
		ref := mechtest.ParsedRef(t, "127.0.0.1:5443/ci/tiny@"+mechtest.Digest1)
		img, err := f.rt.Pull(context.Background(), f.Request(ref, "j1-first", config.PullAlways, auth.Credential{}, io.Discard))
		require.NoError(t, err)
		require.NoError(t, os.Truncate(img.Handle, sifHeaderSize+3))
		img, err = f.rt.Pull(context.Background(), f.Request(ref, jobKey, config.PullAlways, auth.Credential{}, io.Discard))
		require.NoError(t, err)
		assert.Equal(t, 2, f.Pulls(t))
		assert.Equal(t, "miss", img.Cache)
		assert.Equal(t, "SIF image with bash\n", sifText(t, img.Handle))
	})
}

// TestConcurrentJobsPullOnce: jobs of the same user that need the same
// image at once run apptainer pull once.
func TestConcurrentJobsPullOnce(t *testing.T) {
	waited := "hit after waiting (another job built it)"
	suite.ConcurrentJobsPullOnce(t, false, nil, []string{"miss", waited, waited})
}

func TestPullIfNotPresent(t *testing.T) { suite.PullIfNotPresent(t) }

// TestPullNever: the shared cases (mechtest.Suite.PullNever) and what is
// not a SIF.
func TestPullNever(t *testing.T) {
	suite.PullNever(t,
		mechtest.NeverCase[*fakeApptainer]{Name: "a directory is not an image", Setup: func(t *testing.T, f *fakeApptainer, ref policy.Ref) {
			require.NoError(t, f.Store(t).SetTag(ref.Full, mechtest.Digest1))
			require.NoError(t, os.MkdirAll(f.storedSIF(mechtest.Digest1), 0o700))
		}},
		mechtest.NeverCase[*fakeApptainer]{Name: "a truncated SIF is not an image", Setup: func(t *testing.T, f *fakeApptainer, ref policy.Ref) {
			require.NoError(t, f.Store(t).SetTag(ref.Full, mechtest.Digest1))
			require.NoError(t, os.WriteFile(f.storedSIF(mechtest.Digest1), sifFile("SIF image with bash\n")[:sifHeaderSize+4], 0o600))
		}},
	)
}

func TestPullResolveFailures(t *testing.T) { suite.PullResolveFailures(t) }

// TestPullFailures: apptainer itself fails. The references are pinned, so
// no registry is involved.
func TestPullFailures(t *testing.T) {
	pullFails := func(tail string) func(t *testing.T, f *fakeApptainer) {
		return func(t *testing.T, f *fakeApptainer) { f.Set(t, "pull-fail", tail) }
	}
	symlinked := func(dir func(f *fakeApptainer) string) func(t *testing.T, f *fakeApptainer) {
		return func(t *testing.T, f *fakeApptainer) {
			elsewhere := filepath.Join(filepath.Dir(f.App), "elsewhere")
			require.NoError(t, os.Mkdir(elsewhere, 0o700))
			require.NoError(t, os.Symlink(elsewhere, dir(f)))
		}
	}
	anonymous := mechtest.Anonymous
	tests := append(suite.RegistryFailures(tailAuth, tailManifest), []mechtest.PullFailure[*fakeApptainer]{
		{Name: "plain HTTP", Setup: pullFails(tailPlainHTTP),
			Cred: anonymous, Class: failure.System, WantErr: "insecure_registries"},
		{Name: "registry down", Setup: pullFails(tailRefused),
			Cred: aliceCred, Class: failure.System, WantErr: "connection refused"},
		{Name: "exit 0 without a SIF", Setup: func(t *testing.T, f *fakeApptainer) { f.Set(t, "pull-nowrite", "") },
			Cred: anonymous, Class: failure.System, WantErr: "not valid"},
		{Name: "exit 0 with a truncated SIF", Setup: func(t *testing.T, f *fakeApptainer) {
			f.Set(t, "image", string(sifFile("SIF image with bash\n")[:sifHeaderSize+5]))
		}, Cred: anonymous, Class: failure.System, WantErr: "truncated SIF file"},
		{Name: "exit 0 with something else", Setup: func(t *testing.T, f *fakeApptainer) {
			f.Set(t, "image", strings.Repeat("<html>not found</html>\n", 10))
		}, Cred: anonymous, Class: failure.System, WantErr: "not a SIF file"},
		{Name: "image without /bin/sh", Setup: func(t *testing.T, f *fakeApptainer) { f.setImage(t, "nosh\n") },
			Cred: aliceCred, Class: failure.User, WantErr: "has no /bin/sh", Stored: true},
		{Name: "image that apptainer cannot run", Setup: func(t *testing.T, f *fakeApptainer) {
			f.Set(t, "exec-fail", "FATAL:   container creation failed: failed to mount squashfs filesystem: input/output error\n")
		}, Cred: anonymous, Class: failure.System, WantErr: "failed to mount squashfs filesystem", Stored: true},
		{Name: "storage is a symlink", Setup: symlinked(func(f *fakeApptainer) string { return f.Storage }),
			Cred: anonymous, Class: failure.System, WantErr: "symlink"},
		{Name: "store is a symlink", Setup: symlinked(func(f *fakeApptainer) string { return filepath.Dir(f.StoreRoot()) }),
			Cred: anonymous, Class: failure.System, WantErr: "symlink"},
		{Name: "no apptainer", Setup: func(t *testing.T, f *fakeApptainer) {
			require.NoError(t, os.Remove(filepath.Join(f.App, "apptainer")))
		}, Cred: anonymous, Class: failure.System, WantErr: "apptainer not found"},
	}...)
	suite.PullFailures(t, tests, []bool{false}, func(t *testing.T, f *fakeApptainer, tt mechtest.PullFailure[*fakeApptainer], ref policy.Ref, _ string) {
		assert.Empty(t, mechtest.Ls(t, f.Jobs), "nothing left in the job dir")
		assert.Empty(t, mechtest.Ls(t, filepath.Join(f.StoreRoot(), "refs")), "no lease left")
		assert.Empty(t, mechtest.Ls(t, filepath.Join(f.StoreRoot(), "tmp")), "no temporary pull file left")
		if tt.Stored {
			assert.Equal(t, []string{sifKey(mechtest.Digest1)}, f.Entries(t))
			assert.Empty(t, f.Store(t).Meta(sifKey(mechtest.Digest1), "shell"), "no shell recorded")
		} else {
			assert.Empty(t, mechtest.Ls(t, filepath.Join(f.StoreRoot(), "entries")), "nothing stored")
			assert.NoFileExists(t, f.TagRecord(ref), "no tag record for a failed pull")
		}
	})
}

func TestFailedPullKeepsTheStoredImage(t *testing.T) { suite.FailedPullKeepsTheStoredImage(t) }

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
