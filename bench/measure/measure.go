// Package measure times commands for the benchmark programs under bench/:
// warm-up runs, then N timed runs, reported as median and mean, and the
// ratio of two such measurements taken in the same run of the program.
package measure

import (
	"fmt"
	"io"
	"log"
	"os/exec"
	"sort"
	"strings"
	"syscall"
	"time"
)

// Sample is the timings of one command.
type Sample struct {
	Name  string
	Times []time.Duration
}

// Median is the middle timing.
func (s Sample) Median() time.Duration {
	t := append([]time.Duration(nil), s.Times...)
	sort.Slice(t, func(i, j int) bool { return t[i] < t[j] })
	if len(t) == 0 {
		return 0
	}
	if len(t)%2 == 1 {
		return t[len(t)/2]
	}
	return (t[len(t)/2-1] + t[len(t)/2]) / 2
}

// Mean is the average timing.
func (s Sample) Mean() time.Duration {
	if len(s.Times) == 0 {
		return 0
	}
	var sum time.Duration
	for _, t := range s.Times {
		sum += t
	}
	return sum / time.Duration(len(s.Times))
}

// Min is the fastest timing.
func (s Sample) Min() time.Duration {
	m := time.Duration(0)
	for i, t := range s.Times {
		if i == 0 || t < m {
			m = t
		}
	}
	return m
}

// Func times f: warmup untimed runs, then runs timed ones.
func Func(name string, warmup, runs int, f func() error) (Sample, error) {
	s := Sample{Name: name}
	for i := 0; i < warmup+runs; i++ {
		start := time.Now()
		if err := f(); err != nil {
			return s, fmt.Errorf("%s: %w", name, err)
		}
		if i >= warmup {
			s.Times = append(s.Times, time.Since(start))
		}
	}
	return s, nil
}

// Command returns a function that runs argv with env and dir and fails on a
// non-zero exit, for Func.
func Command(argv, env []string, dir string) func() error { return CommandAs(nil, argv, env, dir) }

// CommandAs is Command run with credential cred (nil: as the caller).
func CommandAs(cred *syscall.Credential, argv, env []string, dir string) func() error {
	return func() error {
		cmd := exec.Command(argv[0], argv[1:]...)
		cmd.Env = env
		cmd.Dir = dir
		if cred != nil {
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		}
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("%s: %v: %s", strings.Join(argv, " "), err, out)
		}
		return nil
	}
}

// Must ends a benchmark program on an error: a failed measurement has no
// number to report.
func Must(err error) {
	if err != nil {
		log.Fatal(err)
	}
}

// Ratio is a/b of the medians.
func Ratio(a, b Sample) float64 {
	if b.Median() == 0 {
		return 0
	}
	return float64(a.Median()) / float64(b.Median())
}

// Table writes samples as a Markdown table, each with its ratio to base.
func Table(w io.Writer, base Sample, samples ...Sample) {
	fmt.Fprintln(w, "| command | runs | median | mean | min | ratio to "+base.Name+" (median) |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|")
	for _, s := range append([]Sample{base}, samples...) {
		fmt.Fprintf(w, "| %s | %d | %s | %s | %s | %.2f |\n", s.Name, len(s.Times), ms(s.Median()), ms(s.Mean()), ms(s.Min()), Ratio(s, base))
	}
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond)) }
