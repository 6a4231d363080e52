package stages

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/ci-exec/ci-exec/internal/atomicfile"
	"github.com/ci-exec/ci-exec/internal/batch"
	"github.com/ci-exec/ci-exec/internal/mechanism"
)

// StateFile is the name of the prepare result in the job's state dir.
const StateFile = "state.json"

// State is what prepare decided that later stages cannot recompute: the
// prepared images (their handles, digests, leases and per-job paths). Each
// stage is a new process, and none of them may pull again.
//
// Everything that is policy (where a stage runs, the user's volumes and
// runtime arguments, the runtime's programs) is recomputed from the config
// in every stage instead, so that no file can widen it. The state lives in
// the job's state dir, which no container sees (docs/security.md), and
// what is loaded is checked again: an image handle must be one the
// runtime's own storage or the job's state dir holds (Runtime.CheckImage).
type State struct {
	// Mechanism is the runtime's name.
	Mechanism string `json:"mechanism"`
	// Job is the job's image; nil when the job runs on the host.
	Job *mechanism.Image `json:"job,omitempty"`
	// Runner is runner_image; nil when the runner's stages run on the host.
	Runner *mechanism.Image `json:"runner,omitempty"`
	// Allocation is the job's Slurm allocation (batch.allocate =
	// "prepare"); nil otherwise.
	Allocation *batch.Allocation `json:"allocation,omitempty"`
}

// Save writes the state atomically, mode 0600.
func (s *State) Save(dir string) error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return fmt.Errorf("encode prepare state: %w", err)
	}
	if err := atomicfile.Write(filepath.Join(dir, StateFile), append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("save prepare state: %w", err)
	}
	return nil
}

// ErrNoState means prepare left no state file (it failed, or the job was
// prepared without a run mechanism).
var ErrNoState = errors.New("no prepare state")

// LoadState reads the state saved by prepare. Unknown fields are refused:
// the file is ci-exec's own, and anything else in it was not written by
// this version.
func LoadState(dir string) (*State, error) {
	f, err := os.Open(filepath.Join(dir, StateFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, ErrNoState
	}
	if err != nil {
		return nil, fmt.Errorf("read prepare state: %w", err)
	}
	defer f.Close()
	var s State
	dec := json.NewDecoder(f)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&s); err != nil {
		return nil, fmt.Errorf("decode prepare state %s: %w", filepath.Join(dir, StateFile), err)
	}
	return &s, nil
}
