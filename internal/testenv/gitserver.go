package testenv

import (
	"net"
	"net/http"
	"net/http/cgi"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// GitServer serves bare git repositories over git's smart HTTP protocol
// (git http-backend behind net/http/cgi) on 127.0.0.1 and, like GitLab for
// a job, answers only requests that authenticate as User with Password:
// anything else gets 401 and a Basic challenge, which makes git ask its
// credential helpers.
type GitServer struct {
	// URL is the server's base URL (http://127.0.0.1:PORT), no trailing slash.
	URL string
	// User and Password are the only credentials accepted.
	User, Password string

	root string
	mu   sync.Mutex
	ok   int
	bad  []string
}

// NewGitServer starts a GitServer that lives until the test ends.
func NewGitServer(t testing.TB, user, password string) *GitServer {
	t.Helper()
	backend := RequireBinary(t, "git")
	if out, err := exec.Command(backend, "--exec-path").Output(); err == nil {
		backend = filepath.Join(strings.TrimSpace(string(out)), "git-http-backend")
	}
	if _, err := os.Stat(backend); err != nil {
		Missing(t, "git http-backend not found (%v)", err)
	}
	s := &GitServer{User: user, Password: password, root: t.TempDir()}
	h := &cgi.Handler{Path: backend, Env: []string{"GIT_PROJECT_ROOT=" + s.root, "GIT_HTTP_EXPORT_ALL=1", "GIT_CONFIG_NOSYSTEM=1", "HOME=" + s.root}}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u, p, has := r.BasicAuth()
		if !has || u != s.User || p != s.Password {
			s.mu.Lock()
			if has {
				s.bad = append(s.bad, u)
			}
			s.mu.Unlock()
			w.Header().Set("WWW-Authenticate", `Basic realm="GitLab"`)
			http.Error(w, "HTTP Basic: Access denied", http.StatusUnauthorized)
			return
		}
		s.mu.Lock()
		s.ok++
		s.mu.Unlock()
		h.ServeHTTP(w, r)
	}))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("git server: %v", err)
	}
	srv.Listener = l
	srv.Start()
	t.Cleanup(srv.Close)
	s.URL = srv.URL
	return s
}

// Authenticated is how many requests came with the right credentials.
func (s *GitServer) Authenticated() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ok
}

// Rejected lists the user names of requests that came with wrong
// credentials (requests without any are git's normal first try).
func (s *GitServer) Rejected() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.bad...)
}

// GitRepo describes a repository for AddRepo.
type GitRepo struct {
	// Files are path -> content of the one commit on main.
	Files map[string]string
	// Submodules are path -> URL of gitlinks at commit sha (path -> [URL, sha]).
	Submodules map[string][2]string
}

// AddRepo creates the bare repository name (e.g. "group/project.git")
// with one commit on main and returns the commit's sha. The server's URL
// for it is s.URL + "/" + name.
func (s *GitServer) AddRepo(t testing.TB, name string, repo GitRepo) string {
	t.Helper()
	work := t.TempDir()
	git := func(dir string, args ...string) string {
		t.Helper()
		cmd := exec.Command("git", args...)
		cmd.Dir = dir
		cmd.Env = []string{"PATH=/usr/bin:/bin", "HOME=" + work, "GIT_CONFIG_NOSYSTEM=1",
			"GIT_AUTHOR_NAME=ci-exec test", "GIT_AUTHOR_EMAIL=test@ci-exec.invalid",
			"GIT_COMMITTER_NAME=ci-exec test", "GIT_COMMITTER_EMAIL=test@ci-exec.invalid"}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("git %v: %v\n%s", args, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	git(work, "init", "-q", "-b", "main")
	for p, content := range repo.Files {
		full := filepath.Join(work, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		git(work, "add", p)
	}
	if len(repo.Submodules) > 0 {
		var gm strings.Builder
		for p, sub := range repo.Submodules {
			gm.WriteString("[submodule \"" + p + "\"]\n\tpath = " + p + "\n\turl = " + sub[0] + "\n")
			git(work, "update-index", "--add", "--cacheinfo", "160000,"+sub[1]+","+p)
		}
		if err := os.WriteFile(filepath.Join(work, ".gitmodules"), []byte(gm.String()), 0o644); err != nil {
			t.Fatal(err)
		}
		git(work, "add", ".gitmodules")
	}
	git(work, "commit", "-q", "-m", "test commit")
	sha := git(work, "rev-parse", "HEAD")
	bare := filepath.Join(s.root, filepath.FromSlash(name))
	git(work, "clone", "-q", "--bare", work, bare)
	return sha
}
