package charliecloud

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/mechanism/mechtest"
)

// pullCopy pulls the fake registry's image for job key without SingleFile
// (the job gets a copy in the storage), logging to log.
func (f *fakeCharliecloud) pullCopy(t *testing.T, g *mechtest.Registry, key string, log *mechtest.LogWatch) error {
	_, err := f.pullImage(t, g, key, log)
	return err
}

func (f *fakeCharliecloud) pullImage(t *testing.T, g *mechtest.Registry, key string, log *mechtest.LogWatch) (mechanism.Image, error) {
	t.Helper()
	return f.Pull(f.Request(g.Ref(t), key, config.PullAlways, auth.Credential{}, log))
}

// waitOrDone waits for the log to say text, failing the test if the pull
// (done) ends first.
func waitOrDone(t *testing.T, log *mechtest.LogWatch, text string, done <-chan error) {
	t.Helper()
	select {
	case <-log.Seen(text):
	case err := <-done:
		t.Fatalf("the pull ended (error: %v) without saying %q; the log:\n%s", err, text, log)
	case <-time.After(time.Minute):
		t.Fatalf("the job log never said %q:\n%s", text, log)
	}
}

// TestCopyPathTakesABuildSlot: without SingleFile, ch-image's pull, and a
// full copy of the image, wait for one of the user's build slots
// (max_concurrent_builds) like conversions do.
func TestCopyPathTakesABuildSlot(t *testing.T) {
	for _, tt := range []struct {
		name string
		cfg  config.Mechanism
		// pulled: the image is in the storage already, only a copy is made.
		pulled bool
	}{
		{name: "pull", cfg: config.Mechanism{MaxConcurrentBuilds: 1}},
		{name: "full copy", cfg: config.Mechanism{MaxConcurrentBuilds: 1, AllowedUserArgs: []string{"-w"}}, pulled: true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			g := mechtest.StartRegistry(t, suite.Scheme)
			f := newFake(t, tt.cfg, nil)
			pulls := 0
			if tt.pulled {
				require.NoError(t, f.pullCopy(t, g, "j1-first", &mechtest.LogWatch{}))
				pulls = 1
			}
			// Another job of the user holds the only slot.
			release, err := f.Store(t).BuildSlot(context.Background())
			require.NoError(t, err)
			log := &mechtest.LogWatch{}
			done := make(chan error, 1)
			go func() { done <- f.pullCopy(t, g, "j2-second", log) }()
			waitOrDone(t, log, "Waiting: a build slot", done)
			assert.Equal(t, pulls, f.Pulls(t), "nothing pulled without a slot")
			assert.NoDirExists(t, f.jobCopy("j2-second"), "no copy made without a slot")
			assert.NoDirExists(t, filepath.Join(f.r.jobsDir(), "j2-second"), "no copy made without a slot")
			release()
			require.NoError(t, <-done)
			assert.Equal(t, 1, f.Pulls(t))
			if tt.pulled {
				assert.DirExists(t, filepath.Join(f.r.jobsDir(), "j2-second"))
			} else {
				assert.DirExists(t, f.jobCopy("j2-second"))
			}
		})
	}
}

// TestJobCopyWhenTheJobMayWrite: when the configuration lets ch-run -w in
// (the admin's options, or the user arguments the admin allows), the job's
// copy is a directory of its own, run by path (ch-run refuses -w by name),
// that shares no inode with the stored image, so a job writing to its
// image leaves the stored one as pulled; otherwise it is made of hard
// links in the storage and run by name.
func TestJobCopyWhenTheJobMayWrite(t *testing.T) {
	tests := []struct {
		name   string
		cfg    config.Mechanism
		shared bool
	}{
		{name: "default user args", shared: true},
		{name: "allowed_user_args without -w", cfg: config.Mechanism{AllowedUserArgs: []string{"--set-env", "-t"}}, shared: true},
		{name: "allowed_user_args -w", cfg: config.Mechanism{AllowedUserArgs: []string{"--set-env", "-w"}}},
		{name: "allowed_user_args --write", cfg: config.Mechanism{AllowedUserArgs: []string{"--write"}}},
		{name: "-w allowed but user args disabled", cfg: config.Mechanism{AllowedUserArgs: []string{"-w"}, DisableUserArgs: true}, shared: true},
		{name: "custom_options -w", cfg: config.Mechanism{CustomOptions: []string{"-w"}}},
		{name: "runner_options -tw", cfg: config.Mechanism{RunnerOptions: []string{"-tw"}}},
		{name: "custom_options --cd=/w", cfg: config.Mechanism{CustomOptions: []string{"--cd", "/w", "-c/w"}}, shared: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := mechtest.StartRegistry(t, suite.Scheme)
			f := newFake(t, tt.cfg, nil)
			log := &mechtest.LogWatch{}
			img, err := f.pullImage(t, g, "j1-write", log)
			require.NoError(t, err)
			stored, copyDir := f.stored(g.Ref(t), mechtest.Digest1), f.jobCopy("j1-write")
			info, err := f.r.Probe(context.Background())
			require.NoError(t, err)
			argv, _, err := f.r.Command(mechanism.RunSpec{Info: info, Image: img, Env: []string{"USER=ciuser"}, Argv: []string{img.Shell, "/s"}})
			require.NoError(t, err)
			if tt.shared {
				assert.Equal(t, FormatStorage, img.Format)
				assert.Equal(t, "ci-exec-job:j1-write", img.Handle)
				assert.Equal(t, []string{info.Program("ch-run"), "-s", f.Storage, "--private-tmp", "--set-env", "ci-exec-job:j1-write", "--", "/bin/sh", "/s"}, argv, "run by name")
			} else {
				copyDir = filepath.Join(f.r.jobsDir(), "j1-write")
				assert.Equal(t, FormatDir, img.Format)
				assert.Equal(t, copyDir, img.Handle)
				assert.NoDirExists(t, f.jobCopy("j1-write"))
				assert.Equal(t, []string{info.Program("ch-run"), "--private-tmp", "--set-env", copyDir, "--", "/bin/sh", "/s"}, argv, "run by path, without -s")
				assert.DirExists(t, filepath.Join(copyDir, "builds/ci"), "with the mount points")
			}
			assert.Equal(t, []string{copyDir}, img.Private)
			defer func() {
				require.NoError(t, f.r.Release(context.Background(), img, f.Jobs))
				assert.NoDirExists(t, copyDir, "Release removes the copy")
				assert.DirExists(t, stored)
			}()
			files := 0
			require.NoError(t, filepath.WalkDir(stored, func(p string, d fs.DirEntry, err error) error {
				if err != nil || !d.Type().IsRegular() {
					return err
				}
				rel, _ := filepath.Rel(stored, p)
				files++
				assert.Equal(t, tt.shared, sameFile(t, p, filepath.Join(copyDir, rel)), rel)
				assert.Equal(t, mechtest.ReadString(t, p), mechtest.ReadString(t, filepath.Join(copyDir, rel)), rel)
				return nil
			}))
			assert.Positive(t, files)
			assert.Equal(t, !tt.shared, strings.Contains(log.String(), "Copying the image for this job"), log.String())
			if tt.shared {
				return
			}
			// What ch-run -w lets the job do: change a file of its image.
			name := filepath.Join(copyDir, "etc", "image-name")
			require.NoError(t, os.WriteFile(name, []byte("changed by the job\n"), 0o644))
			require.NoError(t, os.Chmod(filepath.Join(copyDir, "bin", "busybox"), 0o777))
			assert.Equal(t, g.Host+"/ci/tiny@"+mechtest.Digest1+"\n", mechtest.ReadString(t, filepath.Join(stored, "etc", "image-name")), "the stored image is unchanged")
			fi, err := os.Stat(filepath.Join(stored, "bin", "busybox"))
			require.NoError(t, err)
			assert.Equal(t, os.FileMode(0o755), fi.Mode().Perm(), "and so are its modes")
		})
	}
}

func TestHasFlag(t *testing.T) {
	tests := []struct {
		args []string
		want bool
	}{
		{nil, false},
		{[]string{"-w"}, true},
		{[]string{"--write"}, true},
		{[]string{"-tw"}, true},
		{[]string{"-t", "--set-env", "-v"}, false},
		{[]string{"--write-fake"}, false},
		{[]string{"-W"}, false},
		{[]string{"--cd", "-w"}, false}, // -w is --cd's value
		{[]string{"-c", "-w"}, false},
		{[]string{"-cw"}, false}, // "w" is -c's value
		{[]string{"-tc/w", "-v"}, false},
		{[]string{"--cd=/w", "-w"}, true},
		{[]string{"--set-env=X=-w"}, false},
		{[]string{"--", "-w"}, false},
		{[]string{"--no-such-flag"}, true}, // unreadable: assume the worst
		{[]string{"-Z"}, true},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprint(tt.args), func(t *testing.T) {
			assert.Equal(t, tt.want, hasFlag(tt.args, writeFlag))
		})
	}
}
