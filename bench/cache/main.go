// Command cache measures the per-user image store (docs/image-cache.md)
// for a mechanism, all in the same run:
//
//   - warm prepare (the image is in the store: one digest lookup, no pull
//     and no conversion) against cold prepare (empty store: pull and
//     convert), as a ratio;
//   - eight concurrent cold prepares of different jobs against one, as a
//     wall-time ratio, with the number of pulls they made.
//
// It needs the runtimes and the local registry of scripts/test-env.sh.
// Results go in docs/performance.md.
//
//	go run ./bench/cache -mechanism charliecloud|apptainer [-runs 8]
package main

import (
	"bytes"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"

	"github.com/ci-exec/ci-exec/bench/measure"
)

var tables = map[string]string{
	"charliecloud": "convert = true",
	"apptainer":    `application_path = "/opt/apptainer/bin"`,
}

func main() {
	mech := flag.String("mechanism", "charliecloud", "charliecloud or apptainer")
	runs := flag.Int("runs", 8, "timed runs per measurement")
	image := flag.String("image", "127.0.0.1:5444/pub/tiny:latest", "image (anonymous registry)")
	flag.Parse()
	table, ok := tables[*mech]
	if !ok {
		log.Fatalf("unknown -mechanism %q", *mech)
	}
	work, err := os.MkdirTemp("/var/tmp", "ci-exec-bench-cache-")
	measure.Must(err)
	defer os.RemoveAll(work)
	storage := filepath.Join(work, "storage")
	cfg := fmt.Sprintf("[general]\ndata_dir = %q\nrun_mechanism = %q\n[general.%s]\nimage_storage_dir = %q\n%s\n",
		filepath.Join(work, "data"), *mech, *mech, storage, table)
	d, err := measure.NewDriver(work, cfg, "CUSTOM_ENV_CI_JOB_IMAGE="+*image)
	measure.Must(err)
	measure.Must(measure.Command(d.Stage("config"), d.Env, work)())
	emptyStore := func() {
		measure.Must(os.RemoveAll(storage))
		measure.Must(os.MkdirAll(storage, 0o755))
	}

	cold, err := measure.Func("cold prepare (empty store)", 1, *runs, func() error {
		emptyStore()
		return measure.Command(d.Stage("prepare"), d.Env, work)()
	})
	measure.Must(err)
	warm, err := measure.Func("warm prepare (image in the store)", 2, *runs*3, measure.Command(d.Stage("prepare"), d.Env, work))
	measure.Must(err)
	fmt.Printf("# %s\n\n## Warm against cold prepare\n\n", *mech)
	measure.Table(os.Stdout, cold, warm)
	fmt.Printf("\nwarm/cold: %.1f%% (target: under 5%%)\n", 100*measure.Ratio(warm, cold))

	// Eight jobs at once on a cold store, against one.
	job := func(i int) []string {
		return append(append([]string(nil), d.Env...), fmt.Sprintf("CUSTOM_ENV_CI_JOB_ID=%d", 100+i), fmt.Sprintf("CUSTOM_ENV_CI_CONCURRENT_ID=%d", i))
	}
	for i := 0; i < 8; i++ {
		measure.Must(measure.Command(d.Stage("config"), job(i), work)())
	}
	var pulls []int
	eight, err := measure.Func("8 concurrent cold prepares", 0, *runs, func() error {
		emptyStore()
		var wg sync.WaitGroup
		outs := make([]bytes.Buffer, 8)
		errs := make([]error, 8)
		for i := 0; i < 8; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				argv := d.Stage("prepare")
				cmd := exec.Command(argv[0], argv[1:]...)
				cmd.Env, cmd.Dir, cmd.Stdout, cmd.Stderr = job(i), work, &outs[i], &outs[i]
				errs[i] = cmd.Run()
			}(i)
		}
		wg.Wait()
		n := 0
		for i := range outs {
			if errs[i] != nil {
				return fmt.Errorf("job %d: %v: %s", i, errs[i], outs[i].String())
			}
			n += strings.Count(outs[i].String(), "cache miss")
		}
		pulls = append(pulls, n)
		return nil
	})
	measure.Must(err)
	fmt.Printf("\n## Eight concurrent cold prepares\n\n")
	measure.Table(os.Stdout, cold, eight)
	fmt.Printf("\n8 concurrent / 1: %.2f wall time; pulls per round of 8: %v\n", measure.Ratio(eight, cold), pulls)
}
