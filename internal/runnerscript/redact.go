package runnerscript

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"

	"golang.org/x/sys/unix"
)

// Masked replaces a secret in a redacted copy, as in the job log.
const Masked = "[MASKED]"

// Redact replaces every secret in b, in clear and in the forms the runner's
// quoting gives it (inside $'...' or "...", and inside the quoted eval body,
// which quotes the already quoted values once more), by [MASKED]. Secrets
// shorter than MinTokenLen are left alone: masking them would garble
// ordinary words (GitLab itself masks only values of 8 characters or more).
func Redact(b []byte, secrets []string) []byte {
	seen := map[string]bool{}
	var forms []string
	for _, s := range secrets {
		if len(s) < MinTokenLen {
			continue
		}
		for _, r := range representations(s) {
			for _, rr := range append([]string{r}, representations(r)...) {
				if !seen[rr] {
					seen[rr] = true
					forms = append(forms, rr)
				}
			}
		}
	}
	// Longest first, so a secret that contains another is masked whole.
	sort.Slice(forms, func(i, j int) bool { return len(forms[i]) > len(forms[j]) })
	for _, f := range forms {
		b = bytes.ReplaceAll(b, []byte(f), []byte(Masked))
	}
	return b
}

// RedactFile rewrites path with its secrets masked (see Redact), mode 0600,
// replacing the file atomically so that no reader sees a half-written copy.
// It is how ci-exec keeps stage scripts and batch output for retain_logs.
func RedactFile(path string, secrets []string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	red := Redact(b, secrets)
	fi, err := os.Lstat(path)
	if err != nil {
		return err
	}
	if bytes.Equal(red, b) && fi.Mode().Perm() == 0o600 {
		return nil
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+"-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(red); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// Check runs bash's syntax check (bash -n, the text on stdin, no shell
// command line) on script and its eval bodies: bash -n alone does not look
// into the string an eval would run. One bash reads the script and then
// the bodies: the script ends at the top level, so the whole parses only if
// each part does, and a stage pays for one process, not two. bash is the
// path of bash. What bash prints is redacted with secrets.
func Check(ctx context.Context, bash string, script []byte, bodies []string, secrets []string) error {
	var in strings.Builder
	in.Write(script)
	for _, b := range bodies {
		in.WriteString("\n")
		in.WriteString(b)
	}
	// The text goes in as a file (a memfd: never on disk, and the secrets
	// it holds stay in this process and its child): with a pipe Go would
	// copy it through a goroutine, which costs as much as the check.
	stdin, err := memFile(in.String())
	if err != nil {
		return fmt.Errorf("check the script's syntax: %w", err)
	}
	defer stdin.Close()
	cmd := exec.CommandContext(ctx, bash, "--noprofile", "--norc", "-n")
	cmd.Stdin = stdin
	cmd.Env = []string{"PATH=/usr/bin:/bin", "LC_ALL=C"}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err = cmd.Run()
	if err == nil {
		return nil
	}
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		return fmt.Errorf("check the script's syntax with %s: %w", bash, err)
	}
	msg := strings.TrimSpace(string(Redact(stderr.Bytes(), secrets)))
	if i := strings.IndexByte(msg, '\n'); i >= 0 {
		msg = msg[:i]
	}
	return fmt.Errorf("bash -n finds the rewritten script invalid: %s", msg)
}

// memFile returns an anonymous in-memory file holding s, read from the start.
func memFile(s string) (*os.File, error) {
	fd, err := unix.MemfdCreate("ci-exec-script-check", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), "memfd:ci-exec-script-check")
	if _, err := f.WriteString(s); err != nil {
		f.Close()
		return nil, err
	}
	if _, err := f.Seek(0, 0); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}
