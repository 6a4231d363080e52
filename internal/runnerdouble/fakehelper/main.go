// Command fakehelper stands in for the gitlab-runner binary inside a job:
// the helper the runner's stage scripts call as "gitlab-runner
// artifacts-uploader", "artifacts-downloader", "cache-archiver" and
// "cache-extractor". Build it as "gitlab-runner" and put it on the job's
// PATH (see testenv.FakeHelper).
//
// Every call appends one JSON line (runnerdouble.HelperCall) to
// $RUNNER_TEMP_PROJECT_DIR/gitlab-runner-calls.jsonl, mode 0600, with the
// argv it was given and a hash of the CI_JOB_TOKEN in its environment. A
// test reads exactly what each helper process got, however short it lived,
// instead of hoping a ps sample caught it.
//
// Like the real helper it takes the job token from --token or, without the
// flag, from CI_JOB_TOKEN (gitlab-runner common/network.go JobCredentials),
// and fails without one. Its "coordinator" is a directory:
// $CI_BUILDS_DIR/.runnerdouble-artifacts/<job id>.zip. The cache is the
// runner's local cache: the --file archive, relative to the working dir.
package main

import (
	"archive/zip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// call mirrors runnerdouble.HelperCall (this command cannot import it
// without pulling the double into every job image).
type call struct {
	Argv        []string `json:"argv"`
	TokenEnvSet bool     `json:"token_env_set"`
	TokenEnvSum string   `json:"token_env_sha256,omitempty"`
	UID         int      `json:"uid"`
	Pid         int      `json:"pid"`
}

const recordName = "gitlab-runner-calls.jsonl"

// boolFlags take no value; every other --flag takes one.
var boolFlags = map[string]bool{"--untracked": true, "--verbose": true, "--direct-download": true, "--ci-debug-trace": true}

func main() {
	record()
	if len(os.Args) < 2 {
		fatalf("no command")
	}
	if os.Args[1] == "--version" || os.Args[1] == "-v" {
		fmt.Println("Version:      19.4.0 (runnerdouble fake helper)")
		return
	}
	flags := parse(os.Args[2:])
	switch os.Args[1] {
	case "artifacts-uploader":
		token(flags)
		upload(flags)
	case "artifacts-downloader":
		token(flags)
		download(flags)
	case "cache-archiver":
		archiveCache(flags)
	case "cache-extractor":
		extractCache(flags)
	default:
		fatalf("unknown command %q", os.Args[1])
	}
}

func record() {
	dir := os.Getenv("RUNNER_TEMP_PROJECT_DIR")
	if dir == "" {
		fmt.Fprintln(os.Stderr, "fakehelper: RUNNER_TEMP_PROJECT_DIR is not set; not recording this call")
		return
	}
	c := call{Argv: os.Args, UID: os.Getuid(), Pid: os.Getpid()}
	if v, ok := os.LookupEnv("CI_JOB_TOKEN"); ok {
		sum := sha256.Sum256([]byte(v))
		c.TokenEnvSet, c.TokenEnvSum = true, hex.EncodeToString(sum[:])
	}
	b, _ := json.Marshal(c)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		fatalf("record: %v", err)
	}
	f, err := os.OpenFile(filepath.Join(dir, recordName), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		fatalf("record: %v", err)
	}
	defer f.Close()
	if _, err := f.Write(append(b, '\n')); err != nil {
		fatalf("record: %v", err)
	}
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "FATAL: "+format+"\n", args...)
	os.Exit(1)
}

func parse(args []string) map[string][]string {
	out := map[string][]string{}
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "--") {
			fatalf("unexpected argument %q", a)
		}
		if k, v, ok := strings.Cut(a, "="); ok {
			out[k] = append(out[k], v)
			continue
		}
		if boolFlags[a] {
			out[a] = append(out[a], "true")
			continue
		}
		if i+1 >= len(args) {
			fatalf("expected argument for flag `%s'", a)
		}
		out[a] = append(out[a], args[i+1])
		i++
	}
	return out
}

func last(flags map[string][]string, name string) string {
	v := flags[name]
	if len(v) == 0 {
		return ""
	}
	return v[len(v)-1]
}

// token is go-flags' `long:"token" env:"CI_JOB_TOKEN" required:"true"`.
func token(flags map[string][]string) string {
	if t := last(flags, "--token"); t != "" {
		return t
	}
	if t := os.Getenv("CI_JOB_TOKEN"); t != "" {
		return t
	}
	fatalf("the required flag `--token' was not specified")
	return ""
}

func coordinatorFile(flags map[string][]string) string {
	id := last(flags, "--id")
	if id == "" {
		id = os.Getenv("CI_JOB_ID")
	}
	builds := os.Getenv("CI_BUILDS_DIR")
	if builds == "" || id == "" {
		fatalf("CI_BUILDS_DIR and --id are needed")
	}
	return filepath.Join(builds, ".runnerdouble-artifacts", id+".zip")
}

func upload(flags map[string][]string) {
	dst := coordinatorFile(flags)
	n, err := writeZip(dst, flags["--path"])
	if err != nil {
		fatalf("uploading artifacts: %v", err)
	}
	fmt.Printf("Uploading artifacts as \"archive\" to coordinator... 201 Created  id=%s files=%d\n", last(flags, "--id"), n)
}

func download(flags map[string][]string) {
	src := coordinatorFile(flags)
	if _, err := os.Stat(src); err != nil {
		fatalf("downloading artifacts from coordinator... not found  id=%s", last(flags, "--id"))
	}
	n, err := extractZip(src)
	if err != nil {
		fatalf("extracting artifacts: %v", err)
	}
	fmt.Printf("Downloading artifacts from coordinator... ok  id=%s files=%d\n", last(flags, "--id"), n)
}

func archiveCache(flags map[string][]string) {
	file := last(flags, "--file")
	if file == "" {
		fatalf("the --file flag is needed")
	}
	fmt.Println("No URL provided, cache will not be uploaded to shared cache server. Cache will be stored only locally.")
	n, err := writeZip(file, flags["--path"])
	if err != nil {
		fatalf("creating cache: %v", err)
	}
	fmt.Printf("%s: found %d matching artifact files and directories\n", strings.Join(flags["--path"], " "), n)
}

func extractCache(flags map[string][]string) {
	file := last(flags, "--file")
	fmt.Println("No URL provided, cache will not be downloaded from shared cache server. Instead a local version of cache will be extracted.")
	if _, err := os.Stat(file); err != nil {
		fmt.Fprintf(os.Stderr, "WARNING: %s: no such file or directory\n", file)
		os.Exit(1)
	}
	if _, err := extractZip(file); err != nil {
		fatalf("extracting cache: %v", err)
	}
}

// writeZip archives the regular files under each path (globs allowed),
// relative to the working dir.
func writeZip(dst string, paths []string) (int, error) {
	if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
		return 0, err
	}
	f, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	zw := zip.NewWriter(f)
	n := 0
	for _, p := range paths {
		matches, err := filepath.Glob(p)
		if err != nil {
			return n, err
		}
		for _, m := range matches {
			err := filepath.WalkDir(m, func(path string, d fs.DirEntry, err error) error {
				if err != nil || !d.Type().IsRegular() {
					return err
				}
				w, err := zw.Create(filepath.ToSlash(filepath.Clean(path)))
				if err != nil {
					return err
				}
				r, err := os.Open(path)
				if err != nil {
					return err
				}
				defer r.Close()
				n++
				_, err = io.Copy(w, r)
				return err
			})
			if err != nil {
				return n, err
			}
		}
	}
	if err := zw.Close(); err != nil {
		return n, err
	}
	return n, f.Close()
}

func extractZip(src string) (int, error) {
	zr, err := zip.OpenReader(src)
	if err != nil {
		return 0, err
	}
	defer zr.Close()
	n := 0
	for _, zf := range zr.File {
		name := filepath.Clean(filepath.FromSlash(zf.Name))
		if filepath.IsAbs(name) || name == ".." || strings.HasPrefix(name, "../") {
			return n, errors.New("archive entry outside the working dir: " + zf.Name)
		}
		if err := os.MkdirAll(filepath.Dir(name), 0o755); err != nil {
			return n, err
		}
		r, err := zf.Open()
		if err != nil {
			return n, err
		}
		w, err := os.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
		if err != nil {
			r.Close()
			return n, err
		}
		_, err = io.Copy(w, r)
		r.Close()
		if cerr := w.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return n, err
		}
		n++
	}
	return n, nil
}
