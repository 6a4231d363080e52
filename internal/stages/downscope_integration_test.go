package stages_test

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4/jwt"
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
	return authRunnerKeys(t, rt, general, auth, true)
}

// authRunnerKeys is authRunner; withFile false leaves out jwks_file, so
// that the keys come from gitlab_server (which does not answer).
func authRunnerKeys(t *testing.T, rt *runtimeFixture, general, auth string, withFile bool) authEnv {
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
		general += fmt.Sprintf("\nrun_mechanism = %q\n", rt.mechanism())
		mech = fmt.Sprintf("%s\nimage_storage_dir = %q\n%s\n", rt.tableHeader(), storage+"/$USER", rt.table)
	}
	keys := fmt.Sprintf("jwks_file = %q\n", jwks)
	if !withFile {
		keys = ""
	}
	cfg := fmt.Sprintf("[general]\ndata_dir = %q\ngitlab_server = %q\nkill_timeout = \"5s\"\n%s\n%s\n[auth]\ndownscope = \"setuid\"\n%sstate_dir = %q\naudit_log = %q\n%s\n",
		e.data, testServer, general, mech, keys, e.state, e.audit, auth)
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

// assertNoneOwnedBy checks that nothing under dir belongs to any of uids.
func assertNoneOwnedBy(t *testing.T, dir string, uids ...int) {
	t.Helper()
	err := filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if uid := int(fi.Sys().(*syscall.Stat_t).Uid); slices.Contains(uids, uid) {
			t.Errorf("%s belongs to uid %d", p, uid)
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

// TestDownscopedRefusals: every token or account the runner must not run
// is refused in the config stage, without a retry, with one line that
// says why; nothing of the job runs, and the denial is audited.
func TestDownscopedRefusals(t *testing.T) {
	e := authRunner(t, nil, "", `user_blocklist = ["`+testenv.Unprivileged2(t).Name+`"]`)
	forger := idtokentest.New(t, testServer)
	u := testenv.Unprivileged(t).Name
	cases := []struct {
		name  string
		login string
		edit  func(*runnerdouble.Job, *idtokenClaims)
		want  string
	}{
		{"missing", u, func(_ *runnerdouble.Job, c *idtokenClaims) { c.none = true },
			`add ` + "`" + `id_tokens: {SITE_ID_TOKEN: {aud: "` + testServer + `"}}` + "`"},
		{"expired", u, func(_ *runnerdouble.Job, c *idtokenClaims) {
			c.Expiry = jwtDate(time.Now().Add(-time.Hour))
		}, "expired"},
		{"wrong audience", u, func(_ *runnerdouble.Job, c *idtokenClaims) {
			c.Audience = []string{"https://elsewhere.example"}
		}, "audience"},
		{"forged signature", u, func(_ *runnerdouble.Job, c *idtokenClaims) {
			c.opts = append(c.opts, idtokentest.SignWith("RS256", forger.RSA, e.iss.RSAKID))
		}, "signature"},
		{"another job's token", u, func(_ *runnerdouble.Job, c *idtokenClaims) { c.JobID = "1" }, `belongs to job "1", not to this job`},
		{"blocked user", testenv.Unprivileged2(t).Name, nil, "auth.user_blocklist"},
		{"unknown account", "no-such-gitlab-user", nil, `has no local account "no-such-gitlab-user" on host`},
		{"root", "root", nil, "never run as root"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			j := e.job(t, c.login, c.edit)
			marker := "refused-job-ran-" + strconv.FormatInt(j.ID, 10)
			j.Script = []string{"echo " + marker + "-$((1+1))"}
			res := runJob(t, e.runner, j)
			assert.Equal(t, runnerdouble.StateFailed, res.State)
			assert.Equal(t, runnerdouble.ReasonScriptFailure, res.FailureReason, "a refusal is a build failure: retrying cannot help")
			assert.Contains(t, res.Log, c.want)
			assert.NotContains(t, res.Log, marker+"-2", "nothing of a refused job runs")
			assert.Empty(t, res.RunStages())
			assert.Len(t, res.Calls(runnerdouble.KindConfig), 1)
			assert.NoDirExists(t, filepath.Join(e.state, "jobs", strconv.FormatInt(j.ID, 10)))
		})
	}
	denied := 0
	for _, r := range e.auditRecords(t) {
		if r["stage"] == "config" && r["decision"] == "deny" {
			denied++
			assert.NotEmpty(t, r["reason"])
		}
	}
	assert.Equal(t, len(cases), denied, "every refusal is in the audit trail")
}

func jwtDate(t time.Time) *jwt.NumericDate { return jwt.NewNumericDate(t) }

// TestDownscopedKeysUnreachable: when GitLab's keys cannot be fetched the
// job is not the user's fault: a system failure, which the runner retries.
func TestDownscopedKeysUnreachable(t *testing.T) {
	e := authRunnerKeys(t, nil, "", "", false)
	res := runJob(t, e.runner, e.job(t, testenv.Unprivileged(t).Name, nil))
	assert.Equal(t, runnerdouble.ReasonRunnerSystemFailure, res.FailureReason)
	assert.Contains(t, res.Log, testServer+"/oauth/discovery/keys")
	assert.Greater(t, len(res.Calls(runnerdouble.KindConfig))+len(res.Calls(runnerdouble.KindPrepare)), 0)
}

// TestDownscopedContainerJobs: in Charliecloud and Apptainer, for two
// users at once, the image pull, the runtime and the script all run as the
// job's user, and what the job writes belongs to them.
func TestDownscopedContainerJobs(t *testing.T) {
	users := []testenv.User{testenv.Unprivileged(t), testenv.Unprivileged2(t)}
	for _, rt := range runtimes(t) {
		t.Run(rt.name, func(t *testing.T) {
			testenv.RequireBinary(t, rt.program)
			e := authRunner(t, &rt, "", "")
			stop := testenv.WatchUIDs(e.dir)
			results := make([]chan *runnerdouble.Result, len(users))
			for i, u := range users {
				j := e.job(t, u.Name, nil)
				tj := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
				j.Image, j.Registry, j.Token = tj.Image, tj.Registry, tj.Token
				j.Variables["GITLAB_USER_LOGIN"] = "root"
				j.Script = []string{`echo "in-image uid=$(id -u) user=$USER"`, `echo made > from-container.txt`}
				results[i] = make(chan *runnerdouble.Result, 1)
				go func() {
					res, err := runJobErr(t, e.runner, j)
					if err != nil {
						t.Errorf("%s: %v", u.Name, err)
					}
					results[i] <- res
				}()
			}
			for i, u := range users {
				res := <-results[i]
				require.NotNil(t, res)
				require.True(t, res.Succeeded(), "%s: %s", u.Name, res.Error)
				assert.Contains(t, res.Log, fmt.Sprintf("in-image uid=%d user=%s", u.UID, u.Name))
				assert.Equal(t, u.UID, ownerOf(t, filepath.Join(res.ProjectDir, "from-container.txt")))
				assertAllOwnedBy(t, filepath.Join(e.dir, "data", u.Name), u)
				// Rootless Podman's storage holds the image's files under the
				// user's subordinate ids; none may be root's or the other user's.
				assertNoneOwnedBy(t, filepath.Join(e.dir, "storage", u.Name), 0, users[1-i].UID)
			}
			seen := stop()
			for _, u := range users {
				runtimeSeen := false
				for _, l := range seen {
					if !strings.Contains(l, "/data/"+u.Name+"/") && !strings.Contains(l, "/storage/"+u.Name+"/") {
						continue
					}
					assert.True(t, strings.HasPrefix(l, fmt.Sprintf("uid=%d ", u.UID)), "runs as %s: %s", u.Name, l)
					runtimeSeen = runtimeSeen || strings.Contains(l, rt.program) || strings.Contains(l, "ch-image")
				}
				assert.True(t, runtimeSeen, "the watch saw %s's runtime: %v", u.Name, seen)
			}
			digests := 0
			for _, r := range e.auditRecords(t) {
				if r["stage"] == "prepare" && strings.HasPrefix(r["digest"].(string), "sha256:") {
					digests++
				}
			}
			assert.Equal(t, len(users), digests, "the audit trail names each job's image digest")
		})
	}
}

// TestDownscopedSlurmJob: the Slurm job belongs to the job's user.
func TestDownscopedSlurmJob(t *testing.T) {
	testenv.RequireBinary(t, "sbatch")
	requireSlurmUp(t)
	u := testenv.Unprivileged(t)
	e := authRunner(t, nil, "executor = \"slurm\"\n", "")
	j := e.job(t, u.Name, nil)
	j.Script = []string{`echo "node uid=$(id -u)"`, `scontrol show job "$SLURM_JOB_ID" | grep -o 'UserId=[^ ]*'`}
	res := runJob(t, e.runner, j)
	require.True(t, res.Succeeded(), res.Error)
	assert.Contains(t, res.Log, fmt.Sprintf("node uid=%d", u.UID))
	assert.Contains(t, res.Log, fmt.Sprintf("UserId=%s(%d)", u.Name, u.UID))
	var slurm string
	for _, r := range e.auditRecords(t) {
		if r["stage"] == "run" && r["slurm_job"] != "" {
			slurm = r["slurm_job"].(string)
		}
	}
	assert.Regexp(t, `^[0-9]+$`, slurm, "the audit trail names the Slurm job")
}

// TestDownscopedCancel: the runner's SIGTERM reaches the user's stage
// through the privileged front; the script's trap runs and nothing of the
// job is left.
func TestDownscopedCancel(t *testing.T) {
	e := authRunner(t, nil, "", "")
	marker := fmt.Sprintf("CI_EXEC_MARKER_%d", time.Now().UnixNano())
	j := e.job(t, testenv.Unprivileged(t).Name, nil)
	j.Variables["PROC_MARKER"] = marker
	j.Script = []string{
		`trap 'echo "build got TERM"; exit 143' TERM`,
		`sleep 1000 & (setsid sleep 1000 < /dev/null > /dev/null 2>&1 &)`,
		`echo started`, `wait`,
	}
	j.AfterScript = []string{`echo "after status=$CI_JOB_STATUS"`}
	j.CancelOnLog = "started"
	res := runJob(t, e.runner, j)
	assert.Equal(t, runnerdouble.InternalReasonJobCanceled, res.InternalFailureReason)
	assert.Contains(t, res.Log, "build got TERM")
	assert.Contains(t, res.Log, "after status=canceled")
	noProcessWith(t, marker)
}

// TestDownscopedJobCannotReachTheFront: a hostile job of a downscoped
// runner looks for what the privileged part holds: the job's state and
// identity in auth.state_dir, the runner's JOB_RESPONSE_FILE and temp dir,
// the environment of every process above it (the runner's own secret is
// in the front's). It reaches none of it, and a CI_JOB_ID naming another
// job changes nothing.
func TestDownscopedJobCannotReachTheFront(t *testing.T) {
	e := authRunner(t, nil, "", "")
	u := testenv.Unprivileged(t)
	j := e.job(t, u.Name, nil)
	j.Variables["CI_JOB_ID"] = "1"
	j.Variables["STATE_DIR"] = filepath.Join(e.state, "jobs", strconv.FormatInt(j.ID, 10))
	j.Variables["STATE_ROOT"] = e.state
	j.Variables["RUNNER_TMP"] = e.dir
	secret := fmt.Sprintf("front-only-%d", time.Now().UnixNano())
	e.runner.BaseEnv = append(e.runner.BaseEnv, "RUNNER_FRONT_SECRET=x"+secret)
	j.Variables["LEAK_NEEDLE"] = secret
	j.Script = []string{
		`for p in "$STATE_ROOT" "$STATE_DIR" "$STATE_DIR/identity.json"; do if ls "$p" >/dev/null 2>&1 || cat "$p" >/dev/null 2>&1; then echo "reach=OPEN $p"; else echo "reach=closed $p"; fi; done`,
		`n=$(for f in /proc/[0-9]*/environ; do tr '\0' '\n' < "$f" 2>/dev/null; done | grep -c "x$LEAK_NEEDLE" || true); echo "leaks=$n"`,
		`for f in "$RUNNER_TMP"/custom-executor*/response.json; do [ -r "$f" ] && echo "response=READABLE $f"; done; echo response-check-done`,
	}
	res := runJob(t, e.runner, j)
	require.True(t, res.Succeeded(), res.Error)
	assert.Equal(t, 3, strings.Count(res.Log, "\nreach=closed "), "the state dir and its files are out of the job's reach")
	assert.NotContains(t, res.Log, "\nreach=OPEN")
	assert.Contains(t, res.Log, "\nleaks=0", "no process the job can inspect has the runner's environment")
	assert.Contains(t, res.Log, "\nresponse-check-done")
	assert.NotContains(t, res.Log, "\nresponse=READABLE")
	for _, r := range e.auditRecords(t) {
		assert.EqualValues(t, j.ID, r["job_id"], "the job id comes from the runner's payload, not CI_JOB_ID")
	}
}

// TestDownscopedRunAs: the admin's pinned RunAs script lets a job run as a
// service account it asks for in user_variable, and refuses others with
// its own reason.
func TestDownscopedRunAs(t *testing.T) {
	u, svc := testenv.Unprivileged(t), testenv.Unprivileged2(t)
	dir := testenv.PrivateDir(t, testenv.Root(t))
	script := filepath.Join(dir, "runas.sh")
	body := fmt.Sprintf("#!/bin/sh\n[ \"$CI_EXEC_CLAIM_USER_LOGIN\" = %s ] && [ \"$CI_EXEC_RUNAS_USER\" = %s ] && exit 0\n[ -z \"$CI_EXEC_RUNAS_USER\" ] && exit 0\necho \"only %s may run as %s\" >&2\nexit 1\n", u.Name, svc.Name, u.Name, svc.Name)
	require.NoError(t, os.WriteFile(script, []byte(body), 0o755))
	sum := sha256.Sum256([]byte(body))
	e := authRunner(t, nil, "", fmt.Sprintf("[auth.runas]\nvalidation_script = %q\nsha256 = %q\nuser_variable = \"RUNAS_USER\"\n", script, hex.EncodeToString(sum[:])))

	j := e.job(t, u.Name, nil)
	j.Variables["RUNAS_USER"] = svc.Name
	j.Script = []string{`echo "ran as $(id -un)"`}
	res := runJob(t, e.runner, j)
	require.True(t, res.Succeeded(), res.Error)
	assert.Contains(t, res.Log, "ran as "+svc.Name)

	j = e.job(t, "root", nil)
	j.Variables["RUNAS_USER"] = svc.Name
	j.Script = []string{`echo "ran as $(id -un)"`}
	res = runJob(t, e.runner, j)
	assert.Equal(t, runnerdouble.ReasonScriptFailure, res.FailureReason)
	assert.Contains(t, res.Log, "only "+u.Name+" may run as "+svc.Name)
	assert.Empty(t, res.RunStages())
}

// TestDownscopedWithCapabilities: the deployment without root from
// docs/multi-tenant.md. The runner runs as its own account (here the
// second test user); a copy of ci-exec with the setcap line's
// capabilities, executable only by that account's group, is the front;
// the ordinary binary is auth.user_executable. A job of the first test
// user runs as that user. A copy others may execute is refused.
func TestDownscopedWithCapabilities(t *testing.T) {
	testenv.RequireRoot(t)
	setcap := testenv.RequireBinary(t, "setcap")
	runnerAcct, jobUser := testenv.Unprivileged2(t), testenv.Unprivileged(t)
	dir := testenv.PrivateDir(t, runnerAcct)
	data := filepath.Join(dir, "data")
	require.NoError(t, os.Mkdir(data, 0o755))
	require.NoError(t, os.Chown(data, runnerAcct.UID, runnerAcct.GID))
	// The state dir belongs to the runner's account, under dirs only root writes.
	stateParent := testenv.StateRoot(t)
	require.NoError(t, os.Chmod(stateParent, 0o755))
	require.NoError(t, os.Chmod(filepath.Dir(stateParent), 0o755))
	state := filepath.Join(stateParent, "state")
	require.NoError(t, os.Mkdir(state, 0o700))
	require.NoError(t, os.Chown(state, runnerAcct.UID, runnerAcct.GID))

	front := filepath.Join(dir, "ci-exec-auth")
	b, err := os.ReadFile(testenv.Driver(t))
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(front, b, 0o750))
	require.NoError(t, os.Chown(front, 0, runnerAcct.GID))
	require.NoError(t, os.Chmod(front, 0o750))
	out, err := exec.Command(setcap, "cap_setuid,cap_setgid,cap_chown+ep", front).CombinedOutput()
	require.NoError(t, err, "%s", out)

	iss := idtokentest.New(t, testServer)
	jwks := iss.WriteJWKS(t, dir)
	audit := filepath.Join(dir, "audit.jsonl")
	cfg := fmt.Sprintf("[general]\ndata_dir = %q\ngitlab_server = %q\n[auth]\ndownscope = \"setuid\"\njwks_file = %q\nstate_dir = %q\naudit_log = %q\nuser_executable = %q\n",
		data+"/$USER", testServer, jwks, state, audit, testenv.Driver(t))
	path := testenv.WriteConfig(t, dir, cfg)
	runner := runnerConfig(t, runnerAcct, path, dir)
	runner.Driver = front
	e := authEnv{runner: runner, iss: iss, dir: dir, state: state, audit: audit}

	j := e.job(t, jobUser.Name, nil)
	j.Script = []string{`echo "ran as $(id -un) uid=$(id -u)"`, `echo x > made.txt`}
	res := runJob(t, e.runner, j)
	require.True(t, res.Succeeded(), res.Error)
	assert.Contains(t, res.Log, fmt.Sprintf("ran as %s uid=%d", jobUser.Name, jobUser.UID))
	assert.Equal(t, jobUser.UID, ownerOf(t, filepath.Join(res.ProjectDir, "made.txt")))
	assertAllOwnedBy(t, filepath.Join(data, jobUser.Name), jobUser)
	assert.Equal(t, runnerAcct.UID, ownerOf(t, audit))

	// The same copy, executable by everyone: refused.
	require.NoError(t, os.Chmod(front, 0o755))
	out, err = exec.Command(setcap, "cap_setuid,cap_setgid,cap_chown+ep", front).CombinedOutput()
	require.NoError(t, err, "%s", out)
	res = runJob(t, e.runner, e.job(t, jobUser.Name, nil))
	assert.Equal(t, runnerdouble.ReasonRunnerSystemFailure, res.FailureReason)
	assert.Contains(t, res.Log, "has capabilities but other users may run it")
}

// TestDownscopedPrepareRetry: the runner cleans up after a failed prepare
// (which removes the job's recorded identity) and tries again from its
// config stage, which verifies the token again; the retry succeeds.
func TestDownscopedPrepareRetry(t *testing.T) {
	u := testenv.Unprivileged(t)
	rt := charliecloudFixture
	testenv.RequireBinary(t, rt.program)
	flaky := testenv.PrivateDir(t, u)
	script := filepath.Join(flaky, "prep.sh")
	require.NoError(t, os.WriteFile(script, []byte("#!/bin/sh\n[ -e "+flaky+"/failed-once ] && exit 0\ntouch "+flaky+"/failed-once\necho 'prep: transient failure' >&2\nexit 1\n"), 0o755))
	e := authRunner(t, &rt, "", "")
	// prep_script goes into the runtime's table: rewrite the config.
	cfgPath := e.runner.ConfigArgs[1]
	b, err := os.ReadFile(cfgPath)
	require.NoError(t, err)
	doc := strings.Replace(string(b), rt.tableHeader()+"\n", rt.tableHeader()+"\nprep_script = "+strconv.Quote(script)+"\n", 1)
	require.NoError(t, os.WriteFile(cfgPath, []byte(doc), 0o600))

	j := e.job(t, u.Name, nil)
	tj := tokenJob(t, testenv.Fact(t, "CI_EXEC_TEST_IMAGE"))
	j.Image, j.Registry, j.Token = tj.Image, tj.Registry, tj.Token
	j.Script = []string{`echo "ran as $(id -un)"`}
	res := runJob(t, e.runner, j)
	require.True(t, res.Succeeded(), res.Error)
	assert.Contains(t, res.Log, "prep: transient failure")
	assert.Len(t, res.Calls(runnerdouble.KindPrepare), 2, "the first prepare failed, the retry succeeded")
	assert.Contains(t, res.Log, "ran as "+u.Name)
}
