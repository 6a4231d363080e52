package runnerdouble

import (
	"bytes"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// procStat returns the state and process group of a /proc/<pid>/stat entry.
func procStat(pid int) (state byte, pgrp int, ok bool) {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0, 0, false
	}
	// "pid (comm) state ppid pgrp ..."; comm may contain spaces and ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, false
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 3 {
		return 0, 0, false
	}
	pg, err := strconv.Atoi(f[2])
	if err != nil || len(f[0]) == 0 {
		return 0, 0, false
	}
	return f[0][0], pg, true
}

func allPIDs() []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range entries {
		if pid, err := strconv.Atoi(e.Name()); err == nil {
			pids = append(pids, pid)
		}
	}
	sort.Ints(pids)
	return pids
}

// ProcessesInGroup returns the PIDs of the live (non-zombie) processes whose
// process group is pgid, scanning /proc/*/stat. Use StageCall.Pgid to check
// that nothing of a driver call is left running.
func ProcessesInGroup(pgid int) []int {
	var out []int
	for _, pid := range allPIDs() {
		state, pg, ok := procStat(pid)
		if ok && pg == pgid && state != 'Z' && state != 'X' {
			out = append(out, pid)
		}
	}
	return out
}

// ProcessesWithMarker returns the PIDs of live (non-zombie) processes, other
// than the caller, whose /proc/<pid>/cmdline or /proc/<pid>/environ contains
// marker. Put a unique marker in a job variable (it reaches the environment
// of the script's processes) or in a command's arguments.
func ProcessesWithMarker(marker string) []int {
	if marker == "" {
		return nil
	}
	self := os.Getpid()
	m := []byte(marker)
	var out []int
	for _, pid := range allPIDs() {
		if pid == self {
			continue
		}
		state, _, ok := procStat(pid)
		if !ok || state == 'Z' || state == 'X' {
			continue
		}
		dir := filepath.Join("/proc", strconv.Itoa(pid))
		for _, name := range []string{"cmdline", "environ"} {
			b, err := os.ReadFile(filepath.Join(dir, name))
			if err == nil && bytes.Contains(b, m) {
				out = append(out, pid)
				break
			}
		}
	}
	return out
}
