// Package testenv is what integration tests share: the facts that
// scripts/test-env.sh writes about the local test registries, images, users
// and runtimes, the built ci-exec binary, and the rule for missing parts.
//
// The rule: under the test command (scripts/test.sh, and so in CI) the
// variable CI_EXEC_REQUIRE_RUNTIMES=1 is set and a missing runtime, registry
// or user FAILS the test. Only on a developer's laptop, without that
// variable, is it a skip.
package testenv

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// EnvFile is where scripts/test-env.sh records the test environment.
const EnvFile = "/var/lib/ci-exec-test/env"

// Required reports whether missing test dependencies are failures.
func Required() bool { return os.Getenv("CI_EXEC_REQUIRE_RUNTIMES") == "1" }

// Missing fails the test under the test command and skips it otherwise.
func Missing(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if Required() {
		t.Fatalf("test dependency missing (run scripts/test-env.sh): %s", msg)
	}
	t.Skipf("skipped, test dependency missing (run scripts/test-env.sh, or set CI_EXEC_REQUIRE_RUNTIMES=1 to fail): %s", msg)
}

var (
	factsOnce sync.Once
	facts     map[string]string
	factsErr  error
)

// Facts returns the KEY=VALUE facts from EnvFile.
func Facts(t testing.TB) map[string]string {
	t.Helper()
	factsOnce.Do(func() {
		f, err := os.Open(EnvFile)
		if err != nil {
			factsErr = err
			return
		}
		defer f.Close()
		facts = map[string]string{}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			line := strings.TrimSpace(sc.Text())
			if line == "" || strings.HasPrefix(line, "#") {
				continue
			}
			k, v, ok := strings.Cut(line, "=")
			if ok {
				facts[k] = strings.Trim(v, `"'`)
			}
		}
		factsErr = sc.Err()
	})
	if factsErr != nil {
		Missing(t, "read %s: %v", EnvFile, factsErr)
	}
	return facts
}

// Fact returns one fact or reports it missing.
func Fact(t testing.TB, key string) string {
	t.Helper()
	v := Facts(t)[key]
	if v == "" {
		Missing(t, "%s has no %s", EnvFile, key)
	}
	return v
}

// ReadSecretFile returns the trimmed content of a secret file named by a fact.
func ReadSecretFile(t testing.TB, key string) string {
	t.Helper()
	b, err := os.ReadFile(Fact(t, key))
	if err != nil {
		Missing(t, "read %s: %v", key, err)
	}
	return strings.TrimSpace(string(b))
}

// RequireBinary returns the path of a program or reports it missing.
func RequireBinary(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		for _, dir := range []string{"/usr/bin", "/usr/sbin", "/opt/apptainer/bin"} {
			if fi, err := os.Stat(filepath.Join(dir, name)); err == nil && !fi.IsDir() {
				return filepath.Join(dir, name)
			}
		}
		Missing(t, "%s not found", name)
	}
	return p
}

// RequireRoot reports the test missing unless it runs as root (needed to run
// the driver as another, unprivileged user).
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Getuid() != 0 {
		Missing(t, "needs root to switch to the unprivileged test user")
	}
}

// User is a local account a test runs the driver as.
type User struct {
	Name string
	Home string
	UID  int
	GID  int
}

// Credential is the SysProcAttr credential for u.
func (u User) Credential() *syscall.Credential {
	return &syscall.Credential{Uid: uint32(u.UID), Gid: uint32(u.GID)}
}

// Root is the current user when the tests run as root.
func Root(t testing.TB) User {
	t.Helper()
	return lookup(t, "root")
}

// Unprivileged returns the unprivileged test user (fact
// CI_EXEC_TEST_UNPRIV_USER, default "ciuser").
func Unprivileged(t testing.TB) User {
	t.Helper()
	RequireRoot(t)
	name := Facts(t)["CI_EXEC_TEST_UNPRIV_USER"]
	if name == "" {
		name = "ciuser"
	}
	return lookup(t, name)
}

// Unprivileged2 returns the second unprivileged test user.
func Unprivileged2(t testing.TB) User {
	t.Helper()
	RequireRoot(t)
	name := Facts(t)["CI_EXEC_TEST_UNPRIV_USER2"]
	if name == "" {
		name = "ciuser2"
	}
	return lookup(t, name)
}

func lookup(t testing.TB, name string) User {
	t.Helper()
	u, err := user.Lookup(name)
	if err != nil {
		Missing(t, "user %s: %v", name, err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return User{Name: u.Username, Home: u.HomeDir, UID: uid, GID: gid}
}

// Users returns the users container tests run as: root and the unprivileged
// test user (only the current user when not root).
func Users(t testing.TB) []User {
	t.Helper()
	if os.Getuid() != 0 {
		Missing(t, "container tests must run as root and as an unprivileged user; run them as root")
	}
	return []User{Root(t), Unprivileged(t)}
}

// Chown gives path (recursively) to u, so a test temp dir is usable by the
// driver running as u.
func Chown(t testing.TB, path string, u User) {
	t.Helper()
	err := filepath.Walk(path, func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(p, u.UID, u.GID)
	})
	if err != nil {
		t.Fatalf("chown %s: %v", path, err)
	}
}

// PrivateDir returns a fresh directory owned by u whose parents every test
// user can traverse (t.TempDir's parent is 0700 root).
func PrivateDir(t testing.TB, u User) string {
	t.Helper()
	root := "/var/tmp/ci-exec-tests"
	if err := os.MkdirAll(root, 0o755); err != nil {
		t.Fatalf("mkdir %s: %v", root, err)
	}
	_ = os.Chmod(root, 0o1777)
	// The name is cut short: paths under it (image stores, SquashFS
	// entries) must stay within what the runtimes take as a path (ch-run
	// 0.31: about 250 bytes).
	name := strings.ReplaceAll(t.Name(), "/", "_")
	if len(name) > 40 {
		name = name[:40]
	}
	dir, err := os.MkdirTemp(root, name+"-")
	if err != nil {
		t.Fatalf("mkdtemp: %v", err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dir, u.UID, u.GID); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if !t.Failed() || os.Getenv("CI_EXEC_KEEP_TEST_DIRS") == "" {
			RemoveAll(dir)
		}
	})
	return dir
}

// RemoveAll removes dir after unmounting what is mounted under it
// (rootful Podman keeps its storage's overlay dir mounted on itself).
func RemoveAll(dir string) {
	if b, err := os.ReadFile("/proc/self/mounts"); err == nil {
		var under []string
		for _, line := range strings.Split(string(b), "\n") {
			if f := strings.Fields(line); len(f) > 1 && strings.HasPrefix(f[1], dir+"/") {
				under = append(under, f[1])
			}
		}
		for i := len(under) - 1; i >= 0; i-- {
			_ = syscall.Unmount(under[i], syscall.MNT_DETACH)
		}
	}
	_ = os.RemoveAll(dir)
}

var (
	buildOnce sync.Once
	buildPath string
	buildErr  error
)

// Driver builds ./cmd/ci-exec once per test binary and returns its path, in
// a directory every test user can read and execute.
func Driver(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "ci-exec-bin-")
		if err != nil {
			buildErr = err
			return
		}
		_ = os.Chmod(dir, 0o755)
		buildPath = filepath.Join(dir, "ci-exec")
		cmd := exec.Command("go", "build", "-o", buildPath, "./cmd/ci-exec")
		cmd.Dir = ModuleRoot()
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build ./cmd/ci-exec: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatalf("%v", buildErr)
	}
	return buildPath
}

var (
	helperOnce sync.Once
	helperDir  string
	helperErr  error
)

// FakeHelper builds the runner double's fake gitlab-runner helper
// (internal/runnerdouble/fakehelper, static) once per test binary as
// <dir>/gitlab-runner and returns dir, readable and executable by every
// test user: put it first on a job's PATH, or bind it into a container.
// Its calls are read back with runnerdouble.HelperCalls.
func FakeHelper(t testing.TB) string {
	t.Helper()
	helperOnce.Do(func() {
		dir, err := os.MkdirTemp("", "ci-exec-fake-helper-")
		if err != nil {
			helperErr = err
			return
		}
		_ = os.Chmod(dir, 0o755)
		cmd := exec.Command("go", "build", "-o", filepath.Join(dir, "gitlab-runner"), "./internal/runnerdouble/fakehelper")
		cmd.Dir = ModuleRoot()
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			helperErr = fmt.Errorf("go build ./internal/runnerdouble/fakehelper: %v\n%s", err, out)
			return
		}
		helperDir = dir
	})
	if helperErr != nil {
		t.Fatalf("%v", helperErr)
	}
	return helperDir
}

// ModuleRoot is the repository root (where go.mod is).
func ModuleRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// WriteConfig writes a ci-exec TOML config readable by every test user and
// returns its path.
func WriteConfig(t testing.TB, dir, content string) string {
	t.Helper()
	p := filepath.Join(dir, "ci-exec.toml")
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// WatchCmdlines watches every process's command line (/proc/PID/cmdline),
// as `ps` would show it, until the returned stop function is called, and
// reports the command lines that contained any of the needles. Secrets must
// never be there: any user on the host can read them.
//
// With root (CAP_NET_ADMIN) it hears of every exec from the kernel's
// process events connector and reads the new program's argv at once, so
// even a process that lives a millisecond is seen unless it is gone before
// the read (microseconds); a poll of all processes every 5 ms backs it up.
// Where it matters that no call can slip through, make the program record
// its own argv as well (the runner double's fake gitlab-runner helper does:
// runnerdouble.HelperCalls).
func WatchCmdlines(needles ...string) (stop func() []string) {
	return watch(&cmdlineWatch{needles: needles, seen: map[string]bool{}})
}

// WatchUIDs is WatchCmdlines with each hit prefixed "uid=<real uid> ":
// which account every matching process ran as.
func WatchUIDs(needles ...string) (stop func() []string) {
	return watch(&cmdlineWatch{needles: needles, seen: map[string]bool{}, withUID: true})
}

func watch(w *cmdlineWatch) (stop func() []string) {
	l, err := listenExecs(func(pid int) { w.check(itoa(pid)) })
	if err != nil {
		l = nil
	}
	done := make(chan struct{})
	polled := make(chan struct{})
	go func() {
		defer close(polled)
		// Polling competes for the CPU with the exec events' reads: with
		// those, it is only the backstop.
		interval := 5 * time.Millisecond
		if l != nil {
			interval = 50 * time.Millisecond
		}
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			w.poll()
			select {
			case <-done:
				return
			case <-t.C:
			}
		}
	}()
	return func() []string {
		close(done)
		<-polled
		if l != nil && l.close() {
			w.mu.Lock()
			w.hits = append(w.hits, "(the kernel dropped exec events: command lines may have been missed)")
			w.mu.Unlock()
		}
		w.poll()
		w.mu.Lock()
		defer w.mu.Unlock()
		return append([]string(nil), w.hits...)
	}
}

// StateRoot returns a fresh dir for a downscoping runner's auth.state_dir:
// owned by root, 0700, with no dir above it that another user can write
// (unlike PrivateDir's /var/tmp parent), as the runner requires.
func StateRoot(t testing.TB) string {
	t.Helper()
	RequireRoot(t)
	root := "/var/lib/ci-exec-test/auth-state"
	if err := os.MkdirAll(root, 0o700); err != nil {
		t.Fatalf("mkdir %s: %v", root, err)
	}
	name := strings.ReplaceAll(t.Name(), "/", "_")
	if len(name) > 40 {
		name = name[:40]
	}
	dir, err := os.MkdirTemp(root, name+"-")
	if err != nil {
		t.Fatalf("mkdtemp: %v", err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}
