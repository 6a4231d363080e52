package outcome

import (
	"os"

	"golang.org/x/sys/unix"
)

// The start signal tells "the runtime failed" from "the script failed".
//
// A runtime that fails before the stage's script runs exits with a code a
// script may use as well (ch-run 1, apptainer 255, a runtime missing on a
// compute node 127), and the error line it prints is text any script can
// print too: a script that runs ch-run itself and exits 1 after its
// `ch-run[N]: error:` line, or a Perl `die` (255) after a `FATAL:` line.
// Reading stderr cannot settle it, so the executors do not guess: the
// command proves that the script began.
//
// StartCommand makes the container's (or node's) shell write one byte to
// file descriptor StartFD and then exec the real command with that
// descriptor closed. Both runtimes pass inherited descriptors through to
// the command they start (checked with ch-run 0.31 and Apptainer 1.5.3),
// and that byte can only be written once the runtime has built the
// container and started its shell: a runtime that fails writes nothing.
// Locally the descriptor is an anonymous memory file (StartFile); under
// Slurm the batch script opens it on a file next to itself and reports
// the result in its end marker.
//
// The byte is written before any of the job's code runs, and the script
// never sees the descriptor (closed before its exec): a script can
// neither fake the signal nor withhold it. The cost is one exec of the
// image's shell per stage. The program text is a constant (never built
// from user data); the command's words reach it as positional
// parameters, so no shell parses them.

// StartFD is the descriptor the start signal is written to.
const StartFD = 3

// startProgram is the constant shell program of the start signal. The
// write goes first, 2>/dev/null before >&3 so that a missing descriptor
// (an executor that does not watch) prints nothing.
const startProgram = `printf x 2>/dev/null >&3; exec "$@" 3>&-`

// StartCommand wraps argv, a shell and its arguments ([SHELL, SCRIPT],
// [bash, --noprofile, --norc, SCRIPT]), so that argv[0] first signals the
// start on StartFD and then execs argv: argv[0] -c PROGRAM argv[0] argv...
func StartCommand(argv []string) []string {
	out := make([]string, 0, len(argv)+4)
	out = append(out, argv[0], "-c", startProgram, argv[0])
	return append(out, argv...)
}

// StartFile is a local command's StartFD: an anonymous file in memory,
// nothing on disk for a job to find.
type StartFile struct{ f *os.File }

// NewStartFile creates it; pass File() as the command's StartFD.
func NewStartFile() (*StartFile, error) {
	fd, err := unix.MemfdCreate("ci-exec-start", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, err
	}
	return &StartFile{f: os.NewFile(uintptr(fd), "ci-exec-start")}, nil
}

// File is the descriptor to hand to the command.
func (s *StartFile) File() *os.File { return s.f }

// Started reports whether the command wrote its start signal.
func (s *StartFile) Started() bool {
	fi, err := s.f.Stat()
	return err == nil && fi.Size() > 0
}

// Close releases it.
func (s *StartFile) Close() error { return s.f.Close() }
