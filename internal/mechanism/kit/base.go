package kit

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/ci-exec/ci-exec/internal/atomicfile"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/imagecache"
	"github.com/ci-exec/ci-exec/internal/mechanism"
)

// Base is what every runtime keeps about one job user: its table of the
// configuration, the user, the user's image storage and store of converted
// images, the driver's own environment (consulted only for proxy and CA
// settings of pulls), the grace period of tools, and the probe result,
// computed once per process (and remembered in the store while the
// runtime's programs do not change).
type Base struct {
	Name    string
	Cfg     config.Mechanism
	User    config.UserInfo
	Storage string
	HostEnv map[string]string
	Grace   time.Duration
	// EntrySize, when set, is what a store entry counts against
	// cache_max_size (see imagecache.Limits.EntrySize).
	EntrySize func(path string) int64

	probe *probeOnce
	store *storeOnce
}

type probeOnce struct {
	once sync.Once
	info mechanism.Info
	err  error
}

type storeOnce struct {
	once  sync.Once
	store *imagecache.Store
	err   error
}

// NewBase returns the base for runtime name, whose per-user storage
// directory is named <user><suffix> (".ch", ".apptainer").
func NewBase(name string, cfg config.Mechanism, user config.UserInfo, hostEnv map[string]string, grace time.Duration, suffix string) Base {
	return Base{Name: name, Cfg: cfg, User: user, Storage: StorageDir(cfg.ImageStorageDir, user.Name+suffix),
		HostEnv: hostEnv, Grace: grace, probe: &probeOnce{}, store: &storeOnce{}}
}

// StorageDir is a user's image storage: <image_storage_dir>/<name>, by
// default under /var/tmp, as Charliecloud itself would choose.
func StorageDir(imageStorageDir, name string) string {
	if imageStorageDir == "" {
		imageStorageDir = "/var/tmp"
	}
	return filepath.Join(imageStorageDir, name)
}

// StoreRoot is the user's store of converted images for this runtime:
// <image_storage_dir>/<user>.ci-exec/<runtime>.
func (b *Base) StoreRoot() string {
	return filepath.Join(StorageDir(b.Cfg.ImageStorageDir, b.User.Name+".ci-exec"), b.Name)
}

// Store opens the user's store (once per process).
func (b *Base) Store() (*imagecache.Store, error) {
	b.store.once.Do(func() {
		top := filepath.Dir(b.StoreRoot())
		if err := EnsureUserDir(top); err != nil {
			b.store.err = fmt.Errorf("image store: %w", err)
			return
		}
		b.store.store, b.store.err = imagecache.Open(b.StoreRoot(), imagecache.Limits{
			MaxBytes: b.Cfg.CacheMaxSize.Bytes, MaxAge: b.Cfg.CacheMaxAge.Duration, MaxBuilds: b.Cfg.MaxConcurrentBuilds,
			EntrySize: b.EntrySize,
		})
	})
	return b.store.store, b.store.err
}

// Probed returns the runtime's Info: found programs (required and
// optional), and what probe learns from them. It is computed once per
// process and remembered in the store, keyed by the programs' paths, sizes
// and modification times, so that a prepare on a warm image does not run
// the runtime's own start-up again.
func (b *Base) Probed(ctx context.Context, required, optional []string, probe func(context.Context, mechanism.Info) (mechanism.Info, error)) (mechanism.Info, error) {
	b.probe.once.Do(func() { b.probe.info, b.probe.err = b.probeCached(ctx, required, optional, probe) })
	return b.probe.info, b.probe.err
}

func (b *Base) probeCached(ctx context.Context, required, optional []string, probe func(context.Context, mechanism.Info) (mechanism.Info, error)) (mechanism.Info, error) {
	programs, err := FindPrograms(b.Name, b.Cfg.ApplicationPath, required, optional)
	if err != nil {
		return mechanism.Info{}, err
	}
	// The probe's own version is part of the key: a ci-exec that probes
	// more (issue 15's features) must not read an older probe's answer.
	key := probeVersion + programsKey(programs)
	var cacheFile string
	if st, err := b.Store(); err == nil {
		cacheFile = filepath.Join(st.Root, "probe.json")
		var cached struct {
			Key  string         `json:"key"`
			Info mechanism.Info `json:"info"`
		}
		// The cache is the user's own file: it may only repeat what a probe
		// of exactly these programs said, never name other programs.
		if data, err := os.ReadFile(cacheFile); err == nil && json.Unmarshal(data, &cached) == nil && cached.Key == key &&
			maps.Equal(cached.Info.Programs, programs) {
			return cached.Info, nil
		}
	}
	info, err := probe(ctx, mechanism.Info{Programs: programs, Features: map[string]bool{}})
	if err != nil || cacheFile == "" {
		return info, err
	}
	if data, err := json.Marshal(map[string]any{"key": key, "info": info}); err == nil {
		// A failed write only means probing again next time.
		_ = atomicfile.Write(cacheFile, data, 0o600)
	}
	return info, nil
}

// probeVersion changes whenever a runtime's probe reports new things.
const probeVersion = "2;"

// programsKey identifies the installed programs: a changed binary (an
// upgrade) means a new probe.
func programsKey(programs map[string]string) string {
	var parts []string
	for name, p := range programs {
		fi, err := os.Stat(p)
		if err != nil {
			return ""
		}
		parts = append(parts, fmt.Sprintf("%s=%s:%d:%d", name, p, fi.Size(), fi.ModTime().UnixNano()))
	}
	sort.Strings(parts)
	// The prefix changes with what Info holds, so an older cache is probed
	// again.
	return "v2;" + strings.Join(parts, ";")
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

// ReleaseLease ends the job's lease on a store entry, if it has one.
func (b *Base) ReleaseLease(img mechanism.Image) error {
	if img.Lease == "" {
		return nil
	}
	st, err := b.Store()
	if err != nil {
		return err
	}
	return st.Release(img.Lease)
}

// Evict applies the admin's size and age limits to the user's store.
func (b *Base) Evict(ctx context.Context) ([]imagecache.Evicted, error) {
	st, err := b.Store()
	if err != nil {
		return nil, err
	}
	return st.Evict(ctx, time.Now())
}

// CheckSpec rejects a RunSpec no runtime can build a command from.
func CheckSpec(spec mechanism.RunSpec) error {
	if len(spec.Argv) == 0 {
		return errors.New("no command to run")
	}
	if spec.Image.Handle == "" {
		return errors.New("no image")
	}
	return nil
}

// CheckStored checks an image loaded from a job's state against the user's
// store: its handle must be an entry file of the store whose name matches
// entry, and its lease, if any, a lease in the store. A handle anywhere
// else (a file the job planted) is refused.
func (b *Base) CheckStored(img mechanism.Image, entry *regexp.Regexp) error {
	st, err := b.Store()
	if err != nil {
		return err
	}
	name := filepath.Base(img.Handle)
	if !entry.MatchString(name) || st.Path(name) != filepath.Clean(img.Handle) {
		return fmt.Errorf("image %s is not an entry of the image store %s", img.Handle, st.Root)
	}
	if img.Lease == "" {
		return nil
	}
	return st.CheckLease(img.Lease)
}

// Shells are the stage shells runtimes look for in an image, best first.
var Shells = []string{"/bin/bash", "/usr/bin/bash", "/bin/sh", "/usr/bin/sh"}

// CheckShell refuses a stage shell that is not one of Shells.
func CheckShell(shell string) error {
	for _, s := range Shells {
		if shell == s {
			return nil
		}
	}
	return fmt.Errorf("unknown stage shell %q", shell)
}
