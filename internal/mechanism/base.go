package mechanism

import (
	"bytes"
	"context"
	"errors"
	"os/exec"
	"path/filepath"
	"sync"
	"time"

	"github.com/ci-exec/ci-exec/internal/config"
)

// Base is what every runtime keeps about one job user: its table of the
// configuration, the user, the user's image storage, the driver's own
// environment (consulted only for proxy and CA settings of pulls), the
// grace period of tools, and the probe result, computed once per process.
type Base struct {
	Cfg     config.Mechanism
	User    config.UserInfo
	Storage string
	HostEnv map[string]string
	Grace   time.Duration

	probe *probeOnce
}

type probeOnce struct {
	once sync.Once
	info Info
	err  error
}

// NewBase returns the base for a runtime whose per-user storage directory
// is named <user><suffix> (".ch", ".apptainer").
func NewBase(cfg config.Mechanism, user config.UserInfo, hostEnv map[string]string, grace time.Duration, suffix string) Base {
	return Base{Cfg: cfg, User: user, Storage: StorageDir(cfg.ImageStorageDir, user.Name+suffix), HostEnv: hostEnv, Grace: grace, probe: &probeOnce{}}
}

// StorageDir is a user's image storage: <image_storage_dir>/<name>, by
// default under /var/tmp, as Charliecloud itself would choose.
func StorageDir(imageStorageDir, name string) string {
	if imageStorageDir == "" {
		imageStorageDir = "/var/tmp"
	}
	return filepath.Join(imageStorageDir, name)
}

// Probed runs probe once per process and returns its result ever after.
func (b *Base) Probed(ctx context.Context, probe func(context.Context) (Info, error)) (Info, error) {
	b.probe.once.Do(func() { b.probe.info, b.probe.err = probe(ctx) })
	return b.probe.info, b.probe.err
}

// ToolPath is PATH for the runtime's own programs: application_path, when
// set, before base.
func (b *Base) ToolPath(base string) string {
	if b.Cfg.ApplicationPath != "" {
		return b.Cfg.ApplicationPath + ":" + base
	}
	return base
}

// queryTimeout bounds a probe command; runtimes answer in milliseconds.
const queryTimeout = 30 * time.Second

// Query runs a runtime's query (version, help) with a minimal environment
// that has $USER set (ch-run refuses to start without it) and returns its
// stdout and stderr together (ch-run prints its version on stderr).
func (b *Base) Query(ctx context.Context, path string, argv ...string) (string, error) {
	if len(argv) == 0 {
		return "", errors.New("no command")
	}
	ctx, cancel := context.WithTimeout(ctx, queryTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = []string{"PATH=" + path, "USER=" + b.User.Name, "HOME=" + b.User.Home, "LANG=C.UTF-8"}
	var buf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &buf, &buf
	err := cmd.Run()
	return buf.String(), err
}

// CheckSpec rejects a RunSpec no runtime can build a command from.
func CheckSpec(spec RunSpec) error {
	if len(spec.Argv) == 0 {
		return errors.New("no command to run")
	}
	if spec.Image.Handle == "" {
		return errors.New("no image")
	}
	return nil
}
