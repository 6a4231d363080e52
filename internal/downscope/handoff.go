package downscope

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"

	"github.com/ci-exec/ci-exec/internal/job"
)

// The descriptors of a stage started as the job's user (ci-exec as-user).
const (
	handoffFD = 3 // Handoff, JSON, then EOF
	resultFD  = 4 // the child writes its Result here
	scriptFD  = 5 // run stage: the runner's script, opened by the front
)

// AsUserCommand is the hidden command that runs a stage as the job's user.
const AsUserCommand = "as-user"

// maxResult bounds what the front reads back from the child.
const maxResult = 1 << 20

// Handoff is what the privileged front gives the stage it starts as the
// job's user. Everything the child needs that only the runner's account
// can read travels here: the admin config, the trusted job payload (the
// runner's JOB_RESPONSE_FILE is 0600) and prepare's state (root-owned, out
// of the user's reach). The pipe is readable only by this child.
type Handoff struct {
	// Version is the front's build: the child refuses another one (an
	// upgrade between the two would mix state formats).
	Version string `json:"version"`
	// Stage is config, prepare, run or cleanup; ScriptStage names the
	// runner's stage of a run call.
	Stage       string `json:"stage"`
	ScriptStage string `json:"script_stage,omitempty"`
	// Config is the admin configuration document, ConfigPath its name.
	Config     string `json:"config"`
	ConfigPath string `json:"config_path"`
	// Response is the runner's trusted job payload.
	Response *job.Response `json:"response"`
	// State is prepare's result (later stages).
	State json.RawMessage `json:"state,omitempty"`
	// UID is the account the child must be running as; Account and
	// GitLabUser name it for the log.
	UID        int    `json:"uid"`
	Account    string `json:"account"`
	GitLabUser string `json:"gitlab_user"`
}

// Result is what the child reports back when its stage ends.
type Result struct {
	// ScriptCode is the exit code for the runner's BUILD_EXIT_CODE_FILE
	// (which only the runner's account can write).
	ScriptCode *int `json:"script_code,omitempty"`
	// State is the stage's new state (prepare; a run stage that ended a
	// Slurm allocation), kept by the front.
	State json.RawMessage `json:"state,omitempty"`
	// Image, Digest and Slurm go into the audit trail.
	Image  string `json:"image,omitempty"`
	Digest string `json:"digest,omitempty"`
	Slurm  string `json:"slurm,omitempty"`
	// Keep are the PIDs of processes the stage started to outlive it (a
	// job's services, stopped by cleanup): the front does not end them.
	Keep []int `json:"keep,omitempty"`
}

// Child is the as-user side of a handoff.
type Child struct {
	Handoff Handoff
	// Script is the runner's script (run stage), else nil.
	Script *os.File
	// Result is filled by the stage and sent by Finish.
	Result Result
	result *os.File
}

// Accept reads the handoff on fd 3. The inherited descriptors are made
// close-on-exec at once: no program the stage starts may inherit the
// channel to the front or the runner's script.
func Accept(version string) (*Child, error) {
	for _, fd := range []int{handoffFD, resultFD, scriptFD} {
		syscall.CloseOnExec(fd)
	}
	in := os.NewFile(handoffFD, "handoff")
	if in == nil {
		return nil, errors.New("no handoff on fd 3: ci-exec as-user is started by ci-exec itself, never by hand")
	}
	defer in.Close()
	var c Child
	dec := json.NewDecoder(io.LimitReader(in, 64<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c.Handoff); err != nil {
		return nil, fmt.Errorf("read the handoff from the privileged stage: %w", err)
	}
	h := &c.Handoff
	if h.Version != version {
		return nil, fmt.Errorf("the privileged ci-exec is %s but auth.user_executable is %s: install the same version of both", h.Version, version)
	}
	if os.Getuid() != h.UID || os.Geteuid() != h.UID {
		return nil, fmt.Errorf("started as uid %d/%d, not the job user's %d", os.Getuid(), os.Geteuid(), h.UID)
	}
	c.result = os.NewFile(resultFD, "result")
	if c.result == nil {
		return nil, errors.New("no result channel on fd 4")
	}
	if h.Stage == "run" {
		c.Script = os.NewFile(scriptFD, "script")
	}
	return &c, nil
}

// Finish sends the result to the front.
func (c *Child) Finish() error {
	defer c.result.Close()
	if c.Script != nil {
		c.Script.Close()
	}
	return json.NewEncoder(c.result).Encode(c.Result)
}
