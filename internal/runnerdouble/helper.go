package runnerdouble

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// HelperRecord is the file, in a job's <project>.tmp dir, where the fake
// gitlab-runner helper (./fakehelper, built by testenv.FakeHelper) records
// its calls.
const HelperRecord = "gitlab-runner-calls.jsonl"

// HelperCall is one call of the fake gitlab-runner helper as it saw itself:
// its complete argv and whether CI_JOB_TOKEN was in its environment (a
// hash of the value, not the value).
type HelperCall struct {
	Argv        []string `json:"argv"`
	TokenEnvSet bool     `json:"token_env_set"`
	TokenEnvSum string   `json:"token_env_sha256,omitempty"`
	UID         int      `json:"uid"`
	Pid         int      `json:"pid"`
}

// Command is the helper command ("artifacts-uploader", "--version", ...).
func (c HelperCall) Command() string {
	if len(c.Argv) < 2 {
		return ""
	}
	return c.Argv[1]
}

// TokenEnvIs reports whether the helper had exactly token as CI_JOB_TOKEN.
func (c HelperCall) TokenEnvIs(token string) bool {
	sum := sha256.Sum256([]byte(token))
	return c.TokenEnvSet && c.TokenEnvSum == hex.EncodeToString(sum[:])
}

// HelperCalls reads the fake helper's record for a job whose project dir
// is projectDir (Result.ProjectDir); no record is no calls.
func HelperCalls(projectDir string) ([]HelperCall, error) {
	f, err := os.Open(filepath.Join(projectDir+".tmp", HelperRecord))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []HelperCall
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var c HelperCall
		if err := json.Unmarshal(sc.Bytes(), &c); err != nil {
			return out, fmt.Errorf("runnerdouble: %s: %w", HelperRecord, err)
		}
		out = append(out, c)
	}
	return out, sc.Err()
}
