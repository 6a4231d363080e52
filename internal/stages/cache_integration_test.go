package stages_test

// Integration tests of the per-user image store (internal/imagecache)
// through the built ci-exec, the runner double, the real runtimes and the
// local registry of scripts/test-env.sh.

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/runnerdouble"
	"github.com/ci-exec/ci-exec/internal/testenv"
)

// cacheTable is what the cache tests add to a mechanism's table: images
// are converted to a single file, the store's unit.
const cacheTable = "convert = true"

// pushTag copies src to dst in the local registry (skopeo, with the test
// registry's credentials), so a test can move a tag.
func pushTag(t *testing.T, src, dst string) {
	t.Helper()
	skopeo := testenv.RequireBinary(t, "skopeo")
	out, err := exec.Command(skopeo, "copy", "--authfile", testenv.Fact(t, "CI_EXEC_TEST_AUTHFILE"),
		"docker://"+src, "docker://"+dst).CombinedOutput()
	require.NoError(t, err, "skopeo copy %s %s: %s", src, dst, out)
}

// pullCount counts the runtime's pulls and conversions in a job log.
func pullCount(rt runtimeFixture, log string) (pulls, converts int) {
	return strings.Count(log, rt.pullSection), strings.Count(log, "ch-convert ")
}

// storeEntries lists the image files in the user's store.
func storeEntries(t *testing.T, e ctEnv, rt runtimeFixture, u testenv.User) []string {
	t.Helper()
	var out []string
	ents, _ := os.ReadDir(filepath.Join(e.storage, u.Name+".ci-exec", rt.storeName(), "entries"))
	for _, x := range ents {
		if !strings.HasSuffix(x.Name(), ".meta") {
			out = append(out, x.Name())
		}
	}
	return out
}

// podmanImages lists the image IDs in the user's Podman storage.
func podmanImages(t *testing.T, e ctEnv, rt runtimeFixture, u testenv.User) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(e.storage, u.Name+rt.podmanSuffix, "root", "overlay-images", "images.json"))
	require.NoError(t, err)
	var imgs []struct {
		ID string `json:"id"`
	}
	require.NoError(t, json.Unmarshal(b, &imgs))
	var out []string
	for _, i := range imgs {
		out = append(out, i.ID)
	}
	return out
}

func TestCacheSecondJobDoesNotPull(t *testing.T) {
	forEachRuntimeAndUser(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		for _, mode := range []struct{ name, table string }{{"single file", cacheTable}, {"runtime storage", ""}} {
			t.Run(mode.name, func(t *testing.T) {
				e := containerRunner(t, rt, u, "", mode.table)
				job := func() runnerdouble.Job {
					j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
					j.Script = []string{`grep '^ID=' /etc/os-release`}
					return j
				}
				first := runJob(t, e.runner, job())
				require.True(t, first.Succeeded(), first.Error)
				assert.Contains(t, first.Log, "cache miss")
				second := runJob(t, e.runner, job())
				require.True(t, second.Succeeded(), second.Error)
				assert.Contains(t, second.Log, "ID=citiny")
				assert.Regexp(t, `digest sha256:[0-9a-f]{64}, \S+, cache hit, ready in`, second.Log)
				pulls, converts := pullCount(rt, second.Log)
				assert.Zero(t, pulls, "the second job pulls nothing")
				assert.Zero(t, converts, "the second job converts nothing")
			})
		}
	})
}

func TestCachePullPolicies(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		e := containerRunner(t, rt, u, "", cacheTable)
		tag := fmt.Sprintf("%s/ci/cache-%s-%d:latest", testenv.Fact(t, "CI_EXEC_TEST_REGISTRY"), rt.name, time.Now().UnixNano())
		pushTag(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"), tag)
		job := func() runnerdouble.Job {
			j := tokenJob(t, tag)
			j.Script = []string{`cat /etc/ci-exec-version 2>/dev/null || echo "version=v1"`}
			return j
		}

		res := runJob(t, e.runner, job())
		require.True(t, res.Succeeded(), res.Error)
		assert.Contains(t, res.Log, "version=v1")

		// The tag moves to a new image.
		pushTag(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE_V2"), tag)

		// if-not-present keeps what the store has for the tag, without
		// asking the registry.
		cfg := rewritePolicy(t, e, "if-not-present")
		res = runJob(t, cfg, job())
		require.True(t, res.Succeeded(), res.Error)
		assert.Contains(t, res.Log, "version=v1", "if-not-present does not pick up the moved tag")
		assert.Contains(t, res.Log, "cache hit")

		// always asks the registry and picks it up.
		res = runJob(t, e.runner, job())
		require.True(t, res.Succeeded(), res.Error)
		assert.Contains(t, res.Log, "v2", "always picks up the moved tag")
		assert.Contains(t, res.Log, "cache miss")

		// never: the store has the tag, so it runs; an unknown tag fails.
		cfg = rewritePolicy(t, e, "never")
		res = runJob(t, cfg, job())
		require.True(t, res.Succeeded(), res.Error)
		assert.Contains(t, res.Log, "v2")
		j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_REGISTRY")+"/ci/never-pulled:latest")
		j.Script = []string{"echo must-not-run"}
		res = runJob(t, cfg, j)
		assertUserFailure(t, res, `the pull policy is "never"`)
	})
}

// rewritePolicy returns e's runner with a config that differs only in
// pull_policy.
func rewritePolicy(t *testing.T, e ctEnv, policy string) runnerdouble.Config {
	t.Helper()
	path := e.runner.ConfigArgs[1]
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	cfg := string(b)
	if strings.Contains(cfg, "pull_policy") {
		t.Fatalf("config already sets pull_policy")
	}
	cfg = strings.Replace(cfg, "convert = true", "convert = true\npull_policy = \""+policy+"\"", 1)
	newPath := filepath.Join(e.dir, "ci-exec-"+policy+".toml")
	require.NoError(t, os.WriteFile(newPath, []byte(cfg), 0o644))
	c := e.runner
	args := func(stage string) []string { return []string{"--config", newPath, stage} }
	c.ConfigArgs, c.PrepareArgs, c.RunArgs, c.CleanupArgs = args("config"), args("prepare"), args("run"), args("cleanup")
	return c
}

func TestCacheConcurrentColdPrepares(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		e := containerRunner(t, rt, u, "", cacheTable)
		image := testenv.Fact(t, "CI_EXEC_TEST_IMAGE_BASH")
		var wg sync.WaitGroup
		results := make([]*runnerdouble.Result, 8)
		errs := make([]error, len(results))
		for i := range results {
			j := tokenJob(t, image)
			j.ID = int64(1000 + i)
			j.ConcurrentID = i
			j.Script = []string{`grep '^ID=' /etc/os-release`}
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				results[i], errs[i] = runJobErr(t, e.runner, j)
			}(i)
		}
		wg.Wait()
		pulls, converts, misses := 0, 0, 0
		for i, res := range results {
			require.NoError(t, errs[i])
			require.True(t, res.Succeeded(), "job %d: %s", i, res.Error)
			assert.Contains(t, res.Log, "ID=citinybash")
			p, c := pullCount(rt, res.Log)
			pulls += p
			converts += c
			misses += strings.Count(res.Log, "cache miss")
		}
		assert.Equal(t, 1, pulls, "eight concurrent cold prepares, one pull")
		if rt.name == "charliecloud" {
			assert.Equal(t, 1, converts, "and one conversion")
		}
		assert.Equal(t, 1, misses)
		assert.Len(t, storeEntries(t, e, rt, u), 1)
	})
}

// killOnLine is a live-log writer that SIGKILLs the driver processes
// carrying marker as soon as a line containing want reaches the log.
type killOnLine struct {
	mu     sync.Mutex
	want   string
	marker string
	buf    strings.Builder
	killed []int
}

func (k *killOnLine) Write(p []byte) (int, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.buf.Write(p)
	if k.killed == nil && strings.Contains(k.buf.String(), k.want) {
		k.killed = runnerdouble.ProcessesWithMarker(k.marker)
		for _, pid := range k.killed {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	return len(p), nil
}

func TestCacheKilledBuildThenRetry(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		e := containerRunner(t, rt, u, "", cacheTable)
		marker := fmt.Sprintf("CI_EXEC_MARKER_%d", time.Now().UnixNano())
		killer := &killOnLine{want: rt.buildLine, marker: marker}
		e.runner.LiveLog = killer
		j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
		j.Variables = map[string]string{"PROC_MARKER": marker}
		j.Script = []string{`grep '^ID=' /etc/os-release`}
		res := runJob(t, e.runner, j)
		require.NotEmpty(t, killer.killed, "the build was killed (line %q)", rt.buildLine)
		// The runner retries a prepare that died; the retry builds again.
		require.True(t, res.Succeeded(), res.Error)
		assert.Len(t, res.Calls(runnerdouble.KindPrepare), 2)
		assert.Contains(t, res.Log, "ID=citiny")
		// The killed attempt died before its summary line; the retry found
		// nothing usable and built the image.
		assert.Equal(t, 1, strings.Count(res.Log, "cache miss"), "the killed build left nothing the retry would use")
		left, _ := os.ReadDir(filepath.Join(e.storage, u.Name+".ci-exec", rt.storeName(), "tmp"))
		assert.Empty(t, left, "the retry removed the killed build's leftovers")
		assert.Len(t, storeEntries(t, e, rt, u), 1)
	})
}

func TestCacheTruncatedEntryHeals(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		e := containerRunner(t, rt, u, "", cacheTable)
		job := func() runnerdouble.Job {
			j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
			j.Script = []string{`grep '^ID=' /etc/os-release`}
			return j
		}
		res := runJob(t, e.runner, job())
		require.True(t, res.Succeeded(), res.Error)
		entries := storeEntries(t, e, rt, u)
		require.Len(t, entries, 1)
		path := filepath.Join(e.storage, u.Name+".ci-exec", rt.storeName(), "entries", entries[0])
		fi, err := os.Stat(path)
		require.NoError(t, err)
		require.NoError(t, os.Truncate(path, fi.Size()/2))

		res = runJob(t, e.runner, job())
		require.True(t, res.Succeeded(), res.Error)
		assert.Contains(t, res.Log, "cache miss", "the truncated entry is rebuilt")
		assert.Contains(t, res.Log, "ID=citiny")
		fi2, err := os.Stat(path)
		require.NoError(t, err)
		assert.Equal(t, fi.Size(), fi2.Size())
	})
}

func TestCacheEvictionKeepsImagesInUse(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		// A one-byte limit: every image not in use is evicted.
		e := containerRunner(t, rt, u, "", cacheTable+"\ncache_max_size = \"1\"")
		// In the long job's builds dir (slot 001), which its container sees.
		release := filepath.Join(e.data, "builds", "t3stt0k3n", "001", "release")
		long := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
		long.ID, long.ConcurrentID = 2001, 1
		long.Script = []string{"echo long-job-started", fmt.Sprintf("while [ ! -e %s ]; do sleep 0.2; done", release), `grep '^ID=' /etc/os-release`}
		var longRes *runnerdouble.Result
		var longErr error
		started := make(chan struct{})
		longRunner := e.runner
		longRunner.LiveLog = &releaseOnLine{want: "long-job-started", seen: started}
		done := make(chan struct{})
		go func() {
			defer close(done)
			longRes, longErr = runJobErr(t, longRunner, long)
		}()
		select {
		case <-started:
		case <-done:
			require.NoError(t, longErr)
			t.Fatalf("the long job ended early: %s", longRes.Log)
		}
		inUse := storeEntries(t, e, rt, u)
		require.Len(t, inUse, 1)

		other := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE_BASH"))
		other.ID, other.ConcurrentID = 2002, 2
		other.Script = []string{`grep '^ID=' /etc/os-release`}
		res := runJob(t, e.runner, other)
		require.True(t, res.Succeeded(), res.Error)
		assert.NotContains(t, res.Log, "Evicted "+inUse[0], "an image a running job uses is never evicted")
		assert.Contains(t, storeEntries(t, e, rt, u), inUse[0])

		require.NoError(t, os.WriteFile(release, nil, 0o644))
		<-done
		require.NoError(t, longErr)
		require.True(t, longRes.Succeeded(), longRes.Error)
		assert.Contains(t, longRes.Log, "ID=citiny")

		// Now nothing is in use: the next job's prepare evicts the other
		// image and keeps its own.
		again := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
		again.ID = 2003
		again.Script = []string{"true"}
		res = runJob(t, e.runner, again)
		require.True(t, res.Succeeded(), res.Error)
		assert.Contains(t, res.Log, "Evicted ")
		assert.Equal(t, inUse, storeEntries(t, e, rt, u))
		switch rt.name {
		case "podman":
			// The evicted record's image is gone from Podman's storage too.
			rec, err := os.ReadFile(filepath.Join(e.storage, u.Name+".ci-exec", rt.storeName(), "entries", inUse[0]))
			require.NoError(t, err)
			assert.Equal(t, []string{strings.Fields(string(rec))[0]}, podmanImages(t, e, rt, u))
		case "podman-template":
			// The template's remove action took the evicted image away.
			assert.Len(t, podmanImages(t, e, rt, u), 1)
		}
	})
}

func TestCacheStoreIsPrivate(t *testing.T) {
	forEachRuntime(t, func(t *testing.T, rt runtimeFixture, u testenv.User) {
		other := testenv.Unprivileged2(t)
		e := containerRunner(t, rt, u, "", cacheTable)
		// The storage parent is shared, as /var/tmp is.
		require.NoError(t, os.Chmod(e.storage, 0o1777))
		j := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
		j.Script = []string{"true"}
		res := runJob(t, e.runner, j)
		require.True(t, res.Succeeded(), res.Error)
		top := filepath.Join(e.storage, u.Name+".ci-exec")
		for _, d := range []string{top, filepath.Join(top, rt.storeName()), filepath.Join(top, rt.storeName(), "entries")} {
			fi, err := os.Stat(d)
			require.NoError(t, err)
			assert.Equal(t, os.FileMode(0o700), fi.Mode().Perm(), d)
			assert.Equal(t, uint32(u.UID), fi.Sys().(*syscall.Stat_t).Uid, d)
		}
		out, err := exec.Command("runuser", "-u", other.Name, "--", "ls", filepath.Join(top, rt.storeName(), "entries")).CombinedOutput()
		assert.Error(t, err, "another user cannot look into the store: %s", out)

		// Another user plants the victim's store in the shared parent:
		// the victim's job refuses it instead of using it.
		victim := testenv.Unprivileged(t)
		ve := containerRunner(t, rt, victim, "", cacheTable)
		require.NoError(t, os.Chmod(ve.storage, 0o1777))
		plantedStore := filepath.Join(ve.storage, victim.Name+".ci-exec")
		require.NoError(t, os.MkdirAll(filepath.Join(plantedStore, rt.storeName(), "entries"), 0o777))
		testenv.Chown(t, plantedStore, other)
		res = runJob(t, ve.runner, j)
		assert.Equal(t, runnerdouble.ReasonRunnerSystemFailure, res.FailureReason)
		assert.Contains(t, res.Log, fmt.Sprintf("belongs to uid %d", other.UID))
	})
}
