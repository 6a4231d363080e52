package authz

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/idtoken"
	"github.com/ci-exec/ci-exec/internal/proc"
)

// scriptPATH is the only PATH the RunAs script gets.
const scriptPATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// ScriptTimeout bounds one run of the RunAs script.
const ScriptTimeout = 30 * time.Second

// Script runs the admin's pinned auth.runas.validation_script.
//
// The file is opened once, its SHA-256 checked against auth.runas.sha256,
// and that same open file is executed (as /proc/self/fd/3 of the child), so
// the script that runs is the one that was checked even if the path is
// replaced in between. It runs without a shell, with a clean environment:
// PATH, the verified claims as CI_EXEC_CLAIM_<NAME> (USER_LOGIN,
// PROJECT_PATH, ...), and CI_EXEC_RUNAS_USER, the account the job asked for
// ("" for none; the job's own value, untrusted). Its arguments are the
// GitLab login and, when the job asked for one, the requested account.
// Exit 0 approves; the last non-empty line of its standard output, if any,
// names the account to run as (else the requested one, else the login).
// Any other exit denies, and the last line of its standard error is the
// reason shown to the user.
type Script struct {
	Conf config.RunAs
}

// Approve runs the script.
func (s Script) Approve(ctx context.Context, c *idtoken.Claims, requested string) (string, error) {
	path := s.Conf.ValidationScript
	f, err := os.Open(path)
	if err != nil {
		return "", failure.Systemf("auth.runas.validation_script: %v", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", failure.Systemf("auth.runas.validation_script: %v", err)
	}
	if !fi.Mode().IsRegular() || fi.Mode().Perm()&0o022 != 0 {
		return "", failure.Systemf("auth.runas.validation_script %s must be a regular file writable only by its owner (mode %s)", path, fi.Mode())
	}
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", failure.Systemf("auth.runas.validation_script: %v", err)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != s.Conf.SHA256 {
		return "", failure.Systemf("auth.runas.validation_script %s has SHA-256 %s, not the pinned auth.runas.sha256 %s: refusing to run it (update sha256 if the change is yours)", path, got, s.Conf.SHA256)
	}
	env := append([]string{"PATH=" + scriptPATH, "CI_EXEC_RUNAS_USER=" + requested}, c.Env()...)
	argv := []string{"/proc/self/fd/3", c.UserLogin}
	if requested != "" {
		argv = append(argv, requested)
	}
	ctx, cancel := context.WithTimeout(ctx, ScriptTimeout)
	defer cancel()
	out, errb, res, err := proc.Output(ctx, proc.Cmd{Argv: argv, Env: env, Dir: "/", ExtraFiles: []*os.File{f}})
	if err != nil {
		return "", failure.Systemf("run auth.runas.validation_script %s: %v", path, err)
	}
	if res.Stopped {
		return "", failure.Systemf("auth.runas.validation_script %s did not finish within %s", path, ScriptTimeout)
	}
	target := requested
	if target == "" {
		target = c.UserLogin
	}
	if res.ExitCode != 0 {
		why := lastLine(errb)
		if why == "" {
			why = fmt.Sprintf("exit code %d", res.ExitCode)
		}
		return "", failure.Userf("GitLab user %q is denied running as %q by auth.runas.validation_script: %s", c.UserLogin, target, why)
	}
	if named := lastLine(out); named != "" {
		if strings.ContainsAny(named, " \t/:") {
			return "", failure.Systemf("auth.runas.validation_script %s named %q, which is not an account name", path, named)
		}
		return named, nil
	}
	return target, nil
}

func lastLine(b []byte) string {
	lines := bytes.Split(bytes.TrimSpace(b), []byte("\n"))
	return strings.TrimSpace(string(lines[len(lines)-1]))
}
