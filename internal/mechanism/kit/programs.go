package kit

import (
	"os"
	"path/filepath"
	"strings"

	"github.com/ci-exec/ci-exec/internal/failure"
)

// SystemPath is where runtime programs are looked for without
// application_path: a fixed list, never the runner's PATH (which may put a
// version manager's shims first).
const SystemPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// ProgramDirs are the directories searched for a runtime's programs: the
// admin's application_path alone when set.
func ProgramDirs(applicationPath string) []string {
	if applicationPath != "" {
		return []string{applicationPath}
	}
	return filepath.SplitList(SystemPath)
}

// FindPrograms returns the absolute paths of the named programs. Required
// ones that are missing are a system failure that tells the admin what to
// do; optional ones are simply left out.
func FindPrograms(runtime, applicationPath string, required, optional []string) (map[string]string, error) {
	dirs := ProgramDirs(applicationPath)
	out := map[string]string{}
	for _, name := range append(append([]string(nil), required...), optional...) {
		if p, ok := findProgram(dirs, name); ok {
			out[name] = p
		}
	}
	for _, name := range required {
		if out[name] == "" {
			if fi, err := os.Stat(applicationPath); applicationPath != "" && err == nil && !fi.IsDir() {
				// Jacamar's Podman table takes the program itself here; a
				// Jacamar config may name /usr/bin/ch-run.
				return out, failure.Systemf("general.%s.application_path is the directory of the %s programs, not a program: set it to %s instead of %s",
					runtime, runtime, filepath.Dir(applicationPath), applicationPath)
			}
			return out, failure.Systemf("%s: %s not found in %s; install %s or set general.%s.application_path",
				runtime, name, strings.Join(dirs, ":"), runtime, runtime)
		}
	}
	return out, nil
}

// findProgram returns the absolute path of an executable regular file.
func findProgram(dirs []string, name string) (string, bool) {
	for _, d := range dirs {
		p := filepath.Join(d, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0 {
			return p, true
		}
	}
	return "", false
}

// OneLine folds runtime output into one short line for an error message.
func OneLine(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > 300 {
		s = s[:300] + "..."
	}
	return s
}
