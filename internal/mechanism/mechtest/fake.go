package mechtest

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/imagecache"
	"github.com/ci-exec/ci-exec/internal/joblog"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/policy"
)

// Runtime is a runtime under test as a Fake drives it: a mechanism
// runtime that opens the user's store.
type Runtime interface {
	mechanism.Runtime
	Store() (*imagecache.Store, error)
}

// Fake is an installation of fake runtime programs under a test's
// temporary dir, with the directories around it. A runtime's tests embed
// it in their own fake, which installs the programs and makes the runtime.
//
// The fake programs are shell scripts: behaviour files in Rec tell them
// what to do (Set), and they record there what they were given (Lines,
// Count, RecordedEnv). Every runtime's pull program appends a line to
// Rec/pulls when it runs.
type Fake struct {
	App     string // application_path, with the fake programs
	Rec     string // behaviour and record files
	Jobs    string // the job's scripts dir
	Images  string // image_storage_dir
	Storage string // the runtime's image storage for the user (Attach)
	// MountPoints are what Request asks for.
	MountPoints []string

	name, user string
	rt         Runtime
}

// NewFake makes the directories of a fake installation of runtime name
// (config.MechanismCharliecloud, ...) for user; Request asks for
// mountPoints.
func NewFake(t *testing.T, name, user string, mountPoints []string) *Fake {
	t.Helper()
	base := t.TempDir()
	f := &Fake{
		App:         filepath.Join(base, "app"),
		Rec:         filepath.Join(base, "record"),
		Jobs:        filepath.Join(base, "job"),
		Images:      filepath.Join(base, "images"),
		MountPoints: mountPoints,
		name:        name,
		user:        user,
	}
	for _, d := range []string{f.App, f.Rec, f.Jobs, f.Images} {
		require.NoError(t, os.Mkdir(d, 0o755))
	}
	return f
}

// Install writes the fake program App/program; "@RECORD@" in script
// becomes the record dir, quoted for the shell.
func (f *Fake) Install(t *testing.T, program, script string) {
	t.Helper()
	script = strings.ReplaceAll(script, "@RECORD@", "'"+f.Rec+"'")
	require.NoError(t, os.WriteFile(filepath.Join(f.App, program), []byte(script), 0o755))
}

// Config is cfg (tmp_dir and the like) with the fake's application_path
// and image_storage_dir.
func (f *Fake) Config(cfg config.Mechanism) config.Mechanism {
	cfg.ApplicationPath = f.App
	cfg.ImageStorageDir = f.Images
	return cfg
}

// Attach makes rt, made with Config, the runtime under test; storage is
// its image storage for the user.
func (f *Fake) Attach(rt Runtime, storage string) {
	f.rt = rt
	f.Storage = storage
}

// Shared is the fake itself, reached through a runtime's own fake that
// embeds it (see Rig).
func (f *Fake) Shared() *Fake { return f }

// Request is a pull of ref for job key with policy and cred, logging to
// log. Insecure is set: the fake registry can only be reached as an
// insecure registry (self-signed certificate, plain HTTP).
func (f *Fake) Request(ref policy.Ref, key, policy string, cred auth.Credential, log io.Writer) mechanism.PullRequest {
	return mechanism.PullRequest{
		Ref: ref, Policy: policy, Credential: cred, Insecure: true, JobKey: key,
		MountPoints: append([]string(nil), f.MountPoints...), Dir: f.Jobs, Log: joblog.New(log),
	}
}

// Pull runs the runtime's Pull.
func (f *Fake) Pull(req mechanism.PullRequest) (mechanism.Image, error) {
	return f.rt.Pull(context.Background(), req)
}

// Set writes a behaviour file.
func (f *Fake) Set(t *testing.T, name, content string) {
	t.Helper()
	require.NoError(t, os.WriteFile(filepath.Join(f.Rec, name), []byte(content), 0o644))
}

// Unset removes a behaviour or record file.
func (f *Fake) Unset(t *testing.T, name string) {
	t.Helper()
	require.NoError(t, os.RemoveAll(filepath.Join(f.Rec, name)))
}

// Lines reads a record file as lines.
func (f *Fake) Lines(t *testing.T, name string) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(f.Rec, name))
	require.NoError(t, err)
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

// Count is how many lines a record file has (0 when missing): how often
// a fake ran.
func (f *Fake) Count(t *testing.T, name string) int {
	t.Helper()
	if _, err := os.Stat(filepath.Join(f.Rec, name)); os.IsNotExist(err) {
		return 0
	}
	return len(f.Lines(t, name))
}

// Pulls is how often the runtime's pull program ran.
func (f *Fake) Pulls(t *testing.T) int { return f.Count(t, "pulls") }

// RecordedEnv is a recorded environment without what the shell itself
// adds.
func (f *Fake) RecordedEnv(t *testing.T, name string) []string {
	t.Helper()
	var env []string
	for _, kv := range f.Lines(t, name) {
		k, _, _ := strings.Cut(kv, "=")
		if k == "PWD" || k == "OLDPWD" || k == "SHLVL" || k == "_" {
			continue
		}
		env = append(env, kv)
	}
	return env
}

// StoreRoot is the user's store of images for the runtime.
func (f *Fake) StoreRoot() string {
	return filepath.Join(f.Images, f.user+".ci-exec", f.name)
}

// Store opens the user's store as the runtime does.
func (f *Fake) Store(t *testing.T) *imagecache.Store {
	t.Helper()
	st, err := f.rt.Store()
	require.NoError(t, err)
	require.Equal(t, f.StoreRoot(), st.Root)
	return st
}

// Entries are the store's published entries (without their .meta files).
func (f *Fake) Entries(t *testing.T) []string {
	t.Helper()
	var out []string
	for _, n := range Ls(t, filepath.Join(f.StoreRoot(), "entries")) {
		if !strings.HasSuffix(n, ".meta") {
			out = append(out, n)
		}
	}
	return out
}

// TagRecord is the store's record of the digest of ref's last pull
// (imagecache's layout).
func (f *Fake) TagRecord(ref policy.Ref) string {
	return filepath.Join(f.StoreRoot(), "tags", strings.NewReplacer("/", "%", ":", "+", "@", "=").Replace(ref.Full))
}

// AssertStoreClean checks that a failed pull left nothing in the store: no
// entry, no temporary file or build leftovers, no lease.
func (f *Fake) AssertStoreClean(t *testing.T) {
	t.Helper()
	assert.Empty(t, f.Entries(t), "no store entry")
	assert.Empty(t, Ls(t, filepath.Join(f.StoreRoot(), "tmp")), "no temporary pull file or build leftovers")
	assert.Empty(t, Ls(t, filepath.Join(f.StoreRoot(), "refs")), "no lease")
}

// Ls lists a directory's names (none when it does not exist).
func Ls(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if os.IsNotExist(err) {
		return nil
	}
	require.NoError(t, err)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// ReadString is a file's content.
func ReadString(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	return string(b)
}
