package stages

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
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
	// Services are the job's started services (services.go).
	Services []ServiceState `json:"services,omitempty"`
}

// saveState keeps prepare's state: atomically, mode 0600, in the job's
// state dir; or, in a downscoped stage, with the privileged front, which
// keeps it where the job's user cannot change it (package downscope).
func (st *Stage) saveState(s *State) error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return fmt.Errorf("encode prepare state: %w", err)
	}
	if c := st.Inv.Child; c != nil {
		c.Result.State = b
		if s.Job != nil {
			c.Result.Image, c.Result.Digest = s.Job.Ref, s.Job.Digest
		}
		return nil
	}
	if err := atomicfile.Write(filepath.Join(st.Layout.StateDir, StateFile), append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("save prepare state: %w", err)
	}
	return nil
}

// ErrNoState means prepare left no state file (it failed, or the job was
// prepared without a run mechanism).
var ErrNoState = errors.New("no prepare state")

// loadState reads the state saved by prepare (from the handoff in a
// downscoped stage). Unknown fields are refused: the state is ci-exec's
// own, and anything else in it was not written by this version.
func (st *Stage) loadState() (*State, error) {
	var r io.Reader
	where := filepath.Join(st.Layout.StateDir, StateFile)
	if c := st.Inv.Child; c != nil {
		// What this stage saved last, else what the front handed over.
		b := c.Result.State
		if len(b) == 0 {
			b = c.Handoff.State
		}
		if len(b) == 0 {
			return nil, ErrNoState
		}
		r, where = bytes.NewReader(b), "from the privileged stage"
	} else {
		f, err := os.Open(where)
		if errors.Is(err, os.ErrNotExist) {
			return nil, ErrNoState
		}
		if err != nil {
			return nil, fmt.Errorf("read prepare state: %w", err)
		}
		defer f.Close()
		r = f
	}
	var s State
	dec := json.NewDecoder(r)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&s); err != nil {
		return nil, fmt.Errorf("decode prepare state %s: %w", where, err)
	}
	if c := st.Inv.Child; c != nil && s.Job != nil {
		c.Result.Image, c.Result.Digest = s.Job.Ref, s.Job.Digest
	}
	return &s, nil
}
