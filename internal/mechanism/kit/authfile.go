package kit

import (
	"encoding/base64"
	"encoding/json"
	"os"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/mechanism"
)

// WriteAuthFile writes a pull's credential as a containers-auth.json
// (Docker config.json) file at path: mode 0600, created exclusively (a
// killed prepare's file is removed first), so that the secret is never on
// a command line and no other user can read it. It returns "" and writes
// nothing for an anonymous pull.
func WriteAuthFile(path string, req mechanism.PullRequest) (string, error) {
	cred := req.Credential
	if cred.Anonymous() {
		return "", nil
	}
	return path, writeAuth(path, cred, req.Ref.Registry)
}

func writeAuth(path string, cred auth.Credential, fallbackHost string) error {
	host := cred.Registry
	if host == "" {
		host = fallbackHost
	}
	b, err := json.Marshal(map[string]any{"auths": map[string]any{
		host: map[string]string{"auth": base64.StdEncoding.EncodeToString([]byte(cred.Username + ":" + cred.Password()))},
	}})
	if err != nil {
		return err
	}
	_ = os.Remove(path)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	if err := f.Close(); err != nil {
		os.Remove(path)
		return err
	}
	return nil
}
