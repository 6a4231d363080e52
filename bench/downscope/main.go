// Command downscope measures what downscoping adds to a trivial run stage:
// as root with `[auth] downscope = "setuid"` (the privileged front starts
// the stage as the job user) against the same stage run directly as that
// user without downscoping, and against `bash <script>` as that user, all
// timed in the same run. Run it as root; results go in docs/performance.md.
//
//	go run ./bench/downscope [-runs 50] [-user ciuser]
package main

import (
	"crypto/rand"
	"crypto/rsa"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/ci-exec/ci-exec/bench/measure"
)

const server = "https://gitlab.bench.example"

func main() {
	runs := flag.Int("runs", 50, "timed runs per command")
	name := flag.String("user", "ciuser", "the job user")
	flag.Parse()
	if os.Geteuid() != 0 {
		measure.Must(fmt.Errorf("run as root: the benchmark switches to %s", *name))
	}
	u, err := user.Lookup(*name)
	measure.Must(err)
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	cred := &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}

	work, err := os.MkdirTemp("/var/tmp", "ci-exec-bench-downscope-")
	measure.Must(err)
	defer os.RemoveAll(work)
	measure.Must(os.Chmod(work, 0o755))
	state, err := os.MkdirTemp("/var/lib", "ci-exec-bench-state-")
	measure.Must(err)
	defer os.RemoveAll(state)

	// Keys and a token for job 1 of the user, as GitLab would sign them.
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	measure.Must(err)
	jwks, err := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: key.Public(), KeyID: "k", Algorithm: "RS256", Use: "sig"}}})
	measure.Must(err)
	jwksPath := filepath.Join(work, "jwks.json")
	measure.Must(os.WriteFile(jwksPath, jwks, 0o644))
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.RS256, Key: key}, (&jose.SignerOptions{}).WithHeader("kid", "k"))
	measure.Must(err)
	now := time.Now()
	type gitlabClaims struct {
		jwt.Claims
		UserLogin     string `json:"user_login"`
		JobID         string `json:"job_id"`
		ProjectPath   string `json:"project_path"`
		NamespacePath string `json:"namespace_path"`
	}
	tok, err := jwt.Signed(signer).Claims(&gitlabClaims{Claims: jwt.Claims{Issuer: server, Audience: jwt.Audience{server},
		Expiry: jwt.NewNumericDate(now.Add(time.Hour)), IssuedAt: jwt.NewNumericDate(now), NotBefore: jwt.NewNumericDate(now)},
		UserLogin: *name, JobID: "1", ProjectPath: "bench/p", NamespacePath: "bench"}).Serialize()
	measure.Must(err)

	// Two drivers: one downscoping (run as root), one plain (run as the user).
	data := filepath.Join(work, "data")
	measure.Must(os.Mkdir(data, 0o755))
	measure.Must(os.Mkdir(filepath.Join(work, "down"), 0o755)) // the user runs the same binary
	measure.Must(os.Mkdir(filepath.Join(work, "plain"), 0o700))
	down, err := measure.NewDriver(filepath.Join(work, "down"), fmt.Sprintf(
		"[general]\ndata_dir = %q\ngitlab_server = %q\n[auth]\ndownscope = \"setuid\"\njwks_file = %q\nstate_dir = %q\naudit_log = %q\n",
		filepath.Join(data, "$USER"), server, jwksPath, state, filepath.Join(work, "audit.jsonl")), "CUSTOM_ENV_SITE_ID_TOKEN="+tok)
	measure.Must(err)
	plainWork := filepath.Join(work, "plain")
	plain, err := measure.NewDriver(plainWork, fmt.Sprintf("[general]\ndata_dir = %q\n", filepath.Join(plainWork, "data")))
	measure.Must(err)
	measure.Must(filepath.Walk(plainWork, func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(p, uid, gid)
	}))
	scriptPath := filepath.Join(work, "script")
	measure.Must(os.WriteFile(scriptPath, []byte(measure.RunnerScript), 0o755))
	userEnv := append(append([]string(nil), plain.Env...), "HOME="+u.HomeDir, "USER="+*name)

	measure.Must(measure.Command(down.Stage("config"), down.Env, down.Work)())
	measure.Must(measure.CommandAs(cred, plain.Stage("config"), userEnv, plain.Work)())

	bare, err := measure.Func("bash script as the user (bare)", 5, *runs, measure.CommandAs(cred, []string{"/bin/bash", scriptPath}, userEnv, plain.Work))
	measure.Must(err)
	direct, err := measure.Func("ci-exec run, runner as the user", 5, *runs, measure.CommandAs(cred, plain.Stage("run", scriptPath, "build_script"), userEnv, plain.Work))
	measure.Must(err)
	front, err := measure.Func("ci-exec run, root runner downscoping", 5, *runs, measure.Command(down.Stage("run", scriptPath, "build_script"), down.Env, down.Work))
	measure.Must(err)
	measure.Table(os.Stdout, bare, direct, front)
	fmt.Printf("\ndownscoping adds %.1f ms per stage (median; ratio %.2f against the runner as the user)\n",
		float64(front.Median()-direct.Median())/1e6, measure.Ratio(front, direct))
}
