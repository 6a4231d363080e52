// Command charliecloud measures what ci-exec adds on top of Charliecloud,
// each pair timed in the same run:
//
//   - a trivial run stage: `ci-exec run <script> build_script` against bare
//     ch-run with exactly the argv and environment ci-exec logged for that
//     stage, for an image run by name from the storage and for a SquashFS
//     file;
//   - prepare with conversion: `ci-exec prepare` (allowlist, volumes, args,
//     ch-image pull, per-job copy, ch-convert) against `ch-image pull` plus
//     `ch-convert` by hand.
//
// It needs Charliecloud and the local registry of scripts/test-env.sh.
// Results go in docs/performance.md.
//
//	go run ./bench/charliecloud [-runs 20] [-image 127.0.0.1:5444/pub/tiny:latest]
package main

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/google/shlex"

	"github.com/ci-exec/ci-exec/bench/measure"
)

const toolPath = "/usr/sbin:/usr/bin:/sbin:/bin"

func main() {
	runs := flag.Int("runs", 20, "timed runs per run-stage command")
	prepRuns := flag.Int("prepare-runs", 8, "timed runs per prepare command")
	image := flag.String("image", "127.0.0.1:5444/pub/tiny:latest", "image to use (anonymous registry)")
	flag.Parse()
	work, err := os.MkdirTemp("/var/tmp", "ci-exec-bench-ch-")
	must(err)
	defer os.RemoveAll(work)

	fmt.Println("## Run stage")
	for _, mode := range []struct{ name, table string }{
		{"image by name from the storage", ""},
		{"SquashFS file", "convert = true"},
	} {
		dir := filepath.Join(work, strings.Fields(mode.name)[0])
		must(os.MkdirAll(filepath.Join(dir, "storage"), 0o755))
		d := driver(dir, *image, mode.table)
		must(measure.Command(d.Stage("config"), d.Env, dir)())
		must(measure.Command(d.Stage("prepare"), d.Env, dir)())
		script := filepath.Join(dir, "script")
		must(os.WriteFile(script, []byte(measure.RunnerScript), 0o700))
		argv, env, err := loggedCommand(d, script)
		must(err)
		bare, err := measure.Func("bare ch-run, same argv", 3, *runs, measure.Command(argv, env, dir))
		must(err)
		via, err := measure.Func("ci-exec run", 3, *runs, measure.Command(d.Stage("run", script, "build_script"), d.Env, dir))
		must(err)
		fmt.Printf("\n%s (`%s`):\n\n", mode.name, strings.Join(argv[:len(argv)-3], " "))
		measure.Table(os.Stdout, bare, via)
		fmt.Printf("\noverhead: %.1f ms per stage (median), ratio %.2f\n", float64(via.Median()-bare.Median())/1e6, measure.Ratio(via, bare))
		must(measure.Command(d.Stage("cleanup"), d.Env, dir)())
	}

	fmt.Println("\n## Prepare: pull and convert to SquashFS")
	dir := filepath.Join(work, "prepare")
	storage := filepath.Join(dir, "storage")
	must(os.MkdirAll(storage, 0o755))
	d := driver(dir, *image, "convert = true")
	must(measure.Command(d.Stage("config"), d.Env, dir)())
	handStorage := filepath.Join(dir, "hand", os.Getenv("USER")+".ch")
	must(os.MkdirAll(filepath.Dir(handStorage), 0o755))
	handEnv := []string{"PATH=" + toolPath, "HOME=" + dir, "USER=" + os.Getenv("USER"), "CH_IMAGE_CACHE=disabled", "CH_IMAGE_STORAGE=" + handStorage}
	byHand := func() error {
		if err := measure.Command([]string{"ch-image", "pull", *image}, handEnv, dir)(); err != nil {
			return err
		}
		return measure.Command([]string{"ch-convert", "-i", "ch-image", "-o", "squash", *image, filepath.Join(dir, "hand.sqfs")}, handEnv, dir)()
	}
	bare, err := measure.Func("ch-image pull + ch-convert by hand", 1, *prepRuns, byHand)
	must(err)
	via, err := measure.Func("ci-exec prepare (convert = true)", 1, *prepRuns, measure.Command(d.Stage("prepare"), d.Env, dir))
	must(err)
	fmt.Println()
	measure.Table(os.Stdout, bare, via)
	fmt.Printf("\noverhead: %.0f ms per prepare (median), ratio %.2f\n", float64(via.Median()-bare.Median())/1e6, measure.Ratio(via, bare))
}

// driver builds ci-exec with a Charliecloud config in dir.
func driver(dir, image, table string) *measure.Driver {
	cfg := fmt.Sprintf("[general]\ndata_dir = %q\nrun_mechanism = \"charliecloud\"\n[general.charliecloud]\nimage_storage_dir = %q\n%s\n",
		filepath.Join(dir, "data"), filepath.Join(dir, "storage"), table)
	d, err := measure.NewDriver(dir, cfg, "CUSTOM_ENV_CI_JOB_IMAGE="+image)
	must(err)
	return d
}

var envAssign = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*=`)

// loggedCommand runs the stage once through ci-exec and returns the ch-run
// argv and environment it printed to the job log ("env -i K=V... argv").
func loggedCommand(d *measure.Driver, script string) (argv, env []string, err error) {
	argv = d.Stage("run", script, "build_script")
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = d.Env
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return nil, nil, fmt.Errorf("ci-exec run: %v\n%s", err, out.String())
	}
	sc := bufio.NewScanner(&out)
	for sc.Scan() {
		line := sc.Text()
		if i := strings.Index(line, "env -i "); i >= 0 {
			words, err := shlex.Split(line[i+len("env -i "):])
			if err != nil {
				return nil, nil, err
			}
			for len(words) > 0 && envAssign.MatchString(words[0]) {
				env = append(env, words[0])
				words = words[1:]
			}
			return words, env, nil
		}
	}
	return nil, nil, errors.New("ci-exec logged no command line")
}

func must(err error) {
	if err != nil {
		log.Fatal(err)
	}
}
