package mechanism

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/ci-exec/ci-exec/internal/atomicfile"
)

// StateFile is the name of the prepare result in the job's scripts dir.
const StateFile = "mechanism.json"

// State is what prepare decided, for the run stages and cleanup: each is a
// new process, and none of them may pull or probe again. It lives in the
// job's private scripts dir (0700), so only the job user can read or change
// it, and it holds no secret.
type State struct {
	// Mechanism is the runtime's name.
	Mechanism string `json:"mechanism"`
	Info      Info   `json:"info"`
	// Job is the job's image; nil when the job runs on the host.
	Job *Image `json:"job,omitempty"`
	// Runner is runner_image; nil when the runner's stages run on the host.
	Runner *Image `json:"runner,omitempty"`
	// Volumes are the user volumes that passed the policy.
	Volumes []Bind `json:"volumes,omitempty"`
	// UserArgs are the user's run arguments that passed the allowlist.
	UserArgs []string `json:"user_args,omitempty"`
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

// LoadState reads the state saved by prepare.
func LoadState(dir string) (*State, error) {
	b, err := os.ReadFile(filepath.Join(dir, StateFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, ErrNoState
	}
	if err != nil {
		return nil, fmt.Errorf("read prepare state: %w", err)
	}
	var s State
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("decode prepare state %s: %w", filepath.Join(dir, StateFile), err)
	}
	return &s, nil
}
