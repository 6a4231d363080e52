// Command container measures what ci-exec adds on top of a container
// runtime, each pair timed in the same run:
//
//   - a trivial run stage: `ci-exec run <script> build_script` against the
//     bare runtime (ch-run, apptainer exec) with exactly the argv and
//     environment ci-exec logged for that stage; for Charliecloud both for an
//     image run by name from the storage and for a SquashFS file;
//   - prepare: `ci-exec prepare` (allowlist, volumes, args, digest lookup,
//     pull, per-job copy or link, conversion) against the runtime's own pull
//     (and ch-convert) by hand, both into empty storage every time.
//
// It needs the runtimes and the local registry of scripts/test-env.sh.
// Results go in docs/performance.md.
//
//	go run ./bench/container -mechanism charliecloud|apptainer [-runs 20]
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
	mech := flag.String("mechanism", "charliecloud", "charliecloud or apptainer")
	flag.Parse()
	rt, ok := runtimes[*mech]
	if !ok {
		log.Fatalf("unknown -mechanism %q", *mech)
	}
	work, err := os.MkdirTemp("/var/tmp", "ci-exec-bench-"+*mech+"-")
	measure.Must(err)
	defer os.RemoveAll(work)

	fmt.Printf("# %s\n\n## Run stage\n", *mech)
	for _, mode := range rt.modes {
		dir := filepath.Join(work, strings.Fields(mode.name)[0])
		measure.Must(os.MkdirAll(filepath.Join(dir, "storage"), 0o755))
		d := driver(dir, *image, *mech, rt.table+"\n"+mode.table)
		measure.Must(measure.Command(d.Stage("config"), d.Env, dir)())
		measure.Must(measure.Command(d.Stage("prepare"), d.Env, dir)())
		script := filepath.Join(dir, "script")
		measure.Must(os.WriteFile(script, []byte(measure.RunnerScript), 0o700))
		argv, env, err := loggedCommand(d, script)
		measure.Must(err)
		bare, err := measure.Func("bare "+rt.bare+", same argv", 3, *runs, measure.Command(argv, env, dir))
		measure.Must(err)
		via, err := measure.Func("ci-exec run", 3, *runs, measure.Command(d.Stage("run", script, "build_script"), d.Env, dir))
		measure.Must(err)
		fmt.Printf("\n%s (`%s`):\n\n", mode.name, strings.Join(argv, " "))
		measure.Table(os.Stdout, bare, via)
		fmt.Printf("\noverhead: %.1f ms per stage (median), ratio %.2f\n", float64(via.Median()-bare.Median())/1e6, measure.Ratio(via, bare))
		measure.Must(measure.Command(d.Stage("cleanup"), d.Env, dir)())
	}

	fmt.Println("\n## Prepare: " + rt.prepareWhat)
	dir := filepath.Join(work, "prepare")
	measure.Must(os.MkdirAll(filepath.Join(dir, "storage"), 0o755))
	d := driver(dir, *image, *mech, rt.table+"\n"+rt.prepareTable)
	measure.Must(measure.Command(d.Stage("config"), d.Env, dir)())
	hand := filepath.Join(dir, "hand")
	// Both start from empty storage every time: a cold pull each.
	fresh := func(dirs ...string) {
		for _, p := range dirs {
			measure.Must(os.RemoveAll(p))
		}
		measure.Must(os.MkdirAll(hand, 0o755))
	}
	byHand := func() error {
		fresh(hand)
		return rt.byHand(hand, *image)
	}
	viaPrepare := func() error {
		fresh(filepath.Join(dir, "storage"))
		measure.Must(os.MkdirAll(filepath.Join(dir, "storage"), 0o755))
		return measure.Command(d.Stage("prepare"), d.Env, dir)()
	}
	bare, err := measure.Func(rt.byHandName, 1, *prepRuns, byHand)
	measure.Must(err)
	via, err := measure.Func("ci-exec prepare", 1, *prepRuns, viaPrepare)
	measure.Must(err)
	fmt.Println()
	measure.Table(os.Stdout, bare, via)
	fmt.Printf("\noverhead: %.0f ms per prepare (median), ratio %.2f\n", float64(via.Median()-bare.Median())/1e6, measure.Ratio(via, bare))
}

// runtime is what the benchmark needs to know about one mechanism.
type runtime struct {
	table string // [general.<mechanism>] lines
	bare  string // the runtime's run command, for the table
	modes []struct{ name, table string }
	// prepare: ci-exec prepare with prepareTable against byHand.
	prepareWhat, prepareTable, byHandName string
	byHand                                func(dir, image string) error
}

var runtimes = map[string]runtime{
	"charliecloud": {
		bare: "ch-run",
		modes: []struct{ name, table string }{
			{"image by name from the storage", ""},
			{"SquashFS file", "convert = true"},
		},
		prepareWhat:  "pull and convert to SquashFS",
		prepareTable: "convert = true",
		byHandName:   "ch-image pull + ch-convert by hand",
		byHand: func(dir, image string) error {
			env := []string{"PATH=" + toolPath, "HOME=" + dir, "USER=" + os.Getenv("USER"), "CH_IMAGE_CACHE=disabled",
				"CH_IMAGE_STORAGE=" + filepath.Join(dir, "storage")}
			if err := measure.Command([]string{"ch-image", "pull", image}, env, dir)(); err != nil {
				return err
			}
			return measure.Command([]string{"ch-convert", "-i", "ch-image", "-o", "squash", image, filepath.Join(dir, "img.sqfs")}, env, dir)()
		},
	},
	"apptainer": {
		table: `application_path = "/opt/apptainer/bin"`,
		bare:  "apptainer exec",
		modes: []struct{ name, table string }{
			{"SIF file", ""},
		},
		prepareWhat: "pull to SIF",
		byHandName:  "apptainer pull by hand",
		byHand: func(dir, image string) error {
			env := []string{"PATH=/opt/apptainer/bin:" + toolPath, "HOME=" + dir, "USER=" + os.Getenv("USER"),
				"APPTAINER_CACHEDIR=" + filepath.Join(dir, "cache"), "APPTAINER_TMPDIR=" + os.TempDir()}
			return measure.Command([]string{"/opt/apptainer/bin/apptainer", "pull", filepath.Join(dir, "img.sif"), "docker://" + image}, env, dir)()
		},
	},
}

// driver builds ci-exec with a config for mech in dir.
func driver(dir, image, mech, table string) *measure.Driver {
	// retain_logs keeps the stage's script copy, which the bare runtime
	// then runs with the argv ci-exec logged.
	cfg := fmt.Sprintf("[general]\ndata_dir = %q\nrun_mechanism = %q\nretain_logs = true\n[general.%s]\nimage_storage_dir = %q\n%s\n",
		filepath.Join(dir, "data"), mech, mech, filepath.Join(dir, "storage"), table)
	d, err := measure.NewDriver(dir, cfg, "CUSTOM_ENV_CI_JOB_IMAGE="+image)
	measure.Must(err)
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
