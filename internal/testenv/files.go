package testenv

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// AssertNoFileHolds checks that dir has regular files and that none of
// them contains secret (a token left in a checkout or a config file).
func AssertNoFileHolds(t testing.TB, dir, secret string) {
	t.Helper()
	n := 0
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		n++
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if strings.Contains(string(b), secret) {
			t.Errorf("%s holds the token", p)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("walk %s: %v", dir, err)
	}
	if n == 0 {
		t.Fatalf("%s has no files to check", dir)
	}
}
