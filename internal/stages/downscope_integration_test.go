package stages_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/idtoken"
	"github.com/ci-exec/ci-exec/internal/idtoken/idtokentest"
	"github.com/ci-exec/ci-exec/internal/runnerdouble"
	"github.com/ci-exec/ci-exec/internal/testenv"
)

// testServer is the trusted GitLab of the downscoping tests; its keys are
// generated in each test and given to ci-exec in a jwks_file.
const testServer = "https://gitlab.ci-exec.test"

var authJobID atomic.Int64

func init() { authJobID.Store(time.Now().Unix()%1000000*1000 + 500000000) }

// authEnv is a root runner whose ci-exec downscopes every job.
type authEnv struct {
	runner runnerdouble.Config
	iss    *idtokentest.Issuer
	dir    string
	data   string // data_dir with $USER still in it
	state  string // auth.state_dir
	audit  string // the JSON-lines audit trail
}

// authRunner writes a downscoping config (general and auth are extra lines
// of [general] and [auth]; rt, when set, is the job's runtime) and returns
// a runner double running ci-exec as root.
func authRunner(t *testing.T, rt *runtimeFixture, general, auth string) authEnv {
	t.Helper()
	root := testenv.Root(t)
	testenv.RequireRoot(t)
	dir := testenv.PrivateDir(t, root)
	data := filepath.Join(dir, "data")
	require.NoError(t, os.Mkdir(data, 0o755))
	e := authEnv{iss: idtokentest.New(t, testServer), dir: dir, data: data + "/$USER",
		state: testenv.StateRoot(t), audit: filepath.Join(dir, "audit.jsonl")}
	jwks := e.iss.WriteJWKS(t, dir)
	mech := ""
	if rt != nil {
		storage := filepath.Join(dir, "storage")
		require.NoError(t, os.Mkdir(storage, 0o755))
		for _, u := range []testenv.User{testenv.Unprivileged(t), testenv.Unprivileged2(t)} {
			p := filepath.Join(storage, u.Name)
			require.NoError(t, os.Mkdir(p, 0o700))
			require.NoError(t, os.Chown(p, u.UID, u.GID))
		}
		general += fmt.Sprintf("\nrun_mechanism = %q\n", rt.name)
		mech = fmt.Sprintf("[general.%s]\nimage_storage_dir = %q\n%s\n", rt.name, storage+"/$USER", rt.table)
	}
	cfg := fmt.Sprintf("[general]\ndata_dir = %q\ngitlab_server = %q\nkill_timeout = \"5s\"\n%s\n%s\n[auth]\ndownscope = \"setuid\"\njwks_file = %q\nstate_dir = %q\naudit_log = %q\n%s\n",
		e.data, testServer, general, mech, jwks, e.state, e.audit, auth)
	path := testenv.WriteConfig(t, dir, cfg)
	t.Logf("config:\n%s", cfg)
	e.runner = runnerConfig(t, root, path, dir)
	return e
}

// job returns a job of GitLab user login with a valid ID token (change
// the claims with edit) in SITE_ID_TOKEN, as `id_tokens:` gives it.
func (e authEnv) job(t *testing.T, login string, edit func(*runnerdouble.Job, *idtokenClaims)) runnerdouble.Job {
	t.Helper()
	id := authJobID.Add(1)
	c := e.iss.Claims(login, strconv.FormatInt(id, 10), testServer, time.Now())
	j := runnerdouble.Job{ID: id, MaskedVariables: map[string]string{}, Variables: map[string]string{}}
	var opts []idtokentest.Option
	if edit != nil {
		ic := &idtokenClaims{Claims: &c}
		edit(&j, ic)
		opts = ic.opts
		if ic.none {
			return j
		}
	}
	j.MaskedVariables["SITE_ID_TOKEN"] = e.iss.Mint(t, c, opts...)
	return j
}

// auditRecords reads the audit trail.
func (e authEnv) auditRecords(t *testing.T) []map[string]any {
	t.Helper()
	f, err := os.Open(e.audit)
	require.NoError(t, err)
	defer f.Close()
	fi, err := f.Stat()
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm(), "the audit trail is the runner's alone")
	var out []map[string]any
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var m map[string]any
		require.NoError(t, json.Unmarshal(sc.Bytes(), &m), sc.Text())
		out = append(out, m)
	}
	return out
}

// ownerOf is the uid owning path.
func ownerOf(t *testing.T, path string) int {
	t.Helper()
	fi, err := os.Lstat(path)
	require.NoError(t, err)
	return int(fi.Sys().(*syscall.Stat_t).Uid)
}

// assertAllOwnedBy checks that nothing under dir belongs to anyone but u
// (a privileged front must leave nothing root-owned in a user's tree).
func assertAllOwnedBy(t *testing.T, dir string, u testenv.User) {
	t.Helper()
	err := filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if uid := int(fi.Sys().(*syscall.Stat_t).Uid); uid != u.UID {
			t.Errorf("%s belongs to uid %d, not %s (%d)", p, uid, u.Name, u.UID)
		}
		return nil
	})
	require.NoError(t, err)
}

// chainScript prints every process from the script up to the first root
// one (the privileged front) with its real and effective uid.
const chainScript = `p=$$; while [ "$p" -gt 1 ]; do set -- $(awk '/^Uid:/{print $2, $3}' /proc/$p/status); echo "chain $(cat /proc/$p/comm) ruid=$1 euid=$2"; [ "$1" = 0 ] && break; p=$(awk '/^PPid:/{print $2}' /proc/$p/status); done`

// assertChain checks chainScript's output: the script and every process
// above it run as u, up to ci-exec's root front.
func assertChain(t *testing.T, log string, u testenv.User) {
	t.Helper()
	var chain []string
	for _, l := range strings.Split(log, "\n") {
		if i := strings.Index(l, "chain "); i >= 0 && !strings.Contains(l, "awk") {
			chain = append(chain, l[i:])
		}
	}
	require.NotEmpty(t, chain)
	last := chain[len(chain)-1]
	assert.Equal(t, "chain ci-exec ruid=0 euid=0", last, "the privileged front is the first root process above the job")
	me := fmt.Sprintf("ruid=%d euid=%d", u.UID, u.UID)
	sawChild := false
	for _, c := range chain[:len(chain)-1] {
		assert.True(t, strings.HasSuffix(c, me), "%s: every process of the job runs as %s", c, u.Name)
		sawChild = sawChild || strings.HasPrefix(c, "chain ci-exec ")
	}
	assert.True(t, sawChild, "the stage itself (ci-exec as-user) runs as the user: %v", chain)
}

// idtokenClaims lets a test change a job's token: its claims, how it is
// signed (opts), or that the job has none.
type idtokenClaims struct {
	*idtoken.Claims
	opts []idtokentest.Option
	none bool
}

// TestDownscopedHostJobsOfTwoUsers: one root runner runs the jobs of two
// users at once; each runs as its own account (every process, its files,
// its groups and environment), neither can read the other's dirs, and a
// GITLAB_USER_LOGIN naming someone else changes nothing.
func TestDownscopedHostJobsOfTwoUsers(t *testing.T) {
	e := authRunner(t, nil, "", "")
	u1, u2 := testenv.Unprivileged(t), testenv.Unprivileged2(t)
	meet := filepath.Join(e.dir, "meet")
	require.NoError(t, os.Mkdir(meet, 0o1777))
	require.NoError(t, os.Chmod(meet, 0o1777))
	jobFor := func(u, other testenv.User) runnerdouble.Job {
		j := e.job(t, u.Name, nil)
		j.Variables["GITLAB_USER_LOGIN"] = "root"
		j.Variables["OTHER_DATA"] = filepath.Join(e.dir, "data", other.Name)
		j.Script = []string{
			`echo "whoami=$(id -un) uid=$(id -u) gid=$(id -g) groups=$(id -G | tr ' ' ,)"`,
			`echo "env home=$HOME user=$USER logname=$LOGNAME"`,
			chainScript,
			`echo mine > owned.txt`,
			// Both jobs are running when each looks at the other's dir.
			`touch ` + meet + `/$(id -un); for i in $(seq 600); do [ -e ` + meet + `/` + other.Name + ` ] && break; sleep 0.1; done; [ -e ` + meet + `/` + other.Name + ` ]`,
			`if ls "$OTHER_DATA" >/dev/null 2>&1; then echo "other=READABLE"; else echo "other=denied"; fi`,
		}
		return j
	}
	type out struct {
		res *runnerdouble.Result
		err error
	}
	c1, c2 := make(chan out, 1), make(chan out, 1)
	go func() { r, err := runJobErr(t, e.runner, jobFor(u1, u2)); c1 <- out{r, err} }()
	go func() { r, err := runJobErr(t, e.runner, jobFor(u2, u1)); c2 <- out{r, err} }()
	for _, x := range []struct {
		u testenv.User
		c chan out
	}{{u1, c1}, {u2, c2}} {
		o := <-x.c
		require.NoError(t, o.err)
		res, u := o.res, x.u
		require.True(t, res.Succeeded(), "%s: %s", u.Name, res.Error)
		assert.Contains(t, res.Log, fmt.Sprintf("whoami=%s uid=%d gid=%d", u.Name, u.UID, u.GID))
		assert.Contains(t, res.Log, fmt.Sprintf("env home=%s user=%s logname=%s", u.Home, u.Name, u.Name))
		assert.Contains(t, res.Log, fmt.Sprintf("GitLab user %s (verified ID token) runs as local account %s", u.Name, u.Name))
		assert.Contains(t, res.Log, "other=denied")
		assert.NotContains(t, res.Log, "\nother=READABLE")
		assertChain(t, res.Log, u)
		assert.Equal(t, u.UID, ownerOf(t, filepath.Join(res.ProjectDir, "owned.txt")))
		data := filepath.Join(e.dir, "data", u.Name)
		fi, err := os.Stat(data)
		require.NoError(t, err)
		assert.Equal(t, os.FileMode(0o700), fi.Mode().Perm())
		assertAllOwnedBy(t, data, u)
	}
	// The job state left with the jobs; the audit trail has every stage.
	left, _ := os.ReadDir(filepath.Join(e.state, "jobs"))
	assert.Empty(t, left, "cleanup removes each job's state")
	recs := e.auditRecords(t)
	stages := map[string]int{}
	for _, r := range recs {
		assert.Equal(t, "allow", r["decision"], r)
		assert.Equal(t, testServer, r["gitlab_server"])
		assert.Equal(t, "hpc/app", r["project"])
		login := r["gitlab_user"].(string)
		assert.Equal(t, login, r["local_user"])
		stages[login+" "+r["stage"].(string)]++
	}
	for _, u := range []testenv.User{u1, u2} {
		for _, s := range []string{"config", "prepare", "run", "cleanup"} {
			assert.Positive(t, stages[u.Name+" "+s], "audit record of %s's %s stage", u.Name, s)
		}
	}
}
