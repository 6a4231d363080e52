// Command host measures what ci-exec adds to a trivial run stage on the host:
// `ci-exec run <script> build_script` against `bash <script>` for the same
// runner-style script, both timed in the same run. Results go in
// docs/performance.md.
//
//	go run ./bench/host [-runs 50]
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/ci-exec/ci-exec/bench/measure"
)

func main() {
	runs := flag.Int("runs", 50, "timed runs per command")
	flag.Parse()
	work, err := os.MkdirTemp("", "ci-exec-bench-host-")
	measure.Must(err)
	defer os.RemoveAll(work)
	d, err := measure.NewDriver(work, fmt.Sprintf("[general]\ndata_dir = %q\n", filepath.Join(work, "data")))
	measure.Must(err)
	scriptPath := filepath.Join(work, "script")
	measure.Must(os.WriteFile(scriptPath, []byte(measure.RunnerScript), 0o700))
	// Create the layout once, as the config stage would.
	measure.Must(measure.Command(d.Stage("config"), d.Env, work)())

	bare, err := measure.Func("bash script (bare)", 5, *runs, measure.Command([]string{"/bin/bash", scriptPath}, d.Env, work))
	measure.Must(err)
	via, err := measure.Func("ci-exec run script build_script", 5, *runs, measure.Command(d.Stage("run", scriptPath, "build_script"), d.Env, work))
	measure.Must(err)
	measure.Table(os.Stdout, bare, via)
	fmt.Printf("\noverhead per stage: %.1f ms (median), ratio %.2f\n",
		float64(via.Median()-bare.Median())/1e6, measure.Ratio(via, bare))
}
