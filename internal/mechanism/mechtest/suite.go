package mechtest

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/policy"
)

// Rig is a runtime's own fake, which embeds *Fake (Shared is promoted).
type Rig interface {
	Shared() *Fake
}

// Suite is the pull scenarios both runtimes pass, for one runtime: how to
// install its fake, how its registries are reached, its users' credentials
// and the hooks with which it checks its own way of keeping images.
type Suite[F Rig] struct {
	// Install makes a fake installation and the runtime under test; cfg
	// may set tmp_dir and the like.
	Install func(t *testing.T, cfg config.Mechanism, hostEnv map[string]string) F
	// Scheme is how the runtime reaches an insecure registry.
	Scheme Scheme
	// Creds are the runtime's credentials; Password is Creds.User's at
	// the fake registry and Token the job's token.
	Creds           Creds
	Password, Token string
	// Secrets must appear in no argv, error or job log.
	Secrets Secrets
	// Tool is the pull program as messages name it ("ch-image").
	Tool string
	// Image is what a stored image is called in test names ("SIF").
	Image string
	// NotListed is how tag resolution fails at the fake registry when it
	// is not listed as insecure: the test name and the error.
	NotListed Failure
	// SingleFile makes the pulls of PullResolveFailures and
	// PullWithJobToken ask for a single file, so that a runtime that
	// converts gets that far.
	SingleFile bool
	// Refused is what the pull program prints when the registry refuses
	// the connection.
	Refused string

	// Got checks that job key got the image of ref at digest, pulled
	// without SingleFile.
	Got func(t *testing.T, f F, ref policy.Ref, img mechanism.Image, key, digest string)
	// Retag is called when the registry's tag moves to Digest2, so that
	// the fake's next pull can be told from the first; nil for nothing.
	Retag func(t *testing.T, f F)
	// Remove takes the image of ref at digest out of the store, as
	// eviction or a hand would.
	Remove func(t *testing.T, f F, ref policy.Ref, digest string)
	// Kept checks, after a pull of Digest2 for job key failed, that the
	// image of Digest1 stays as it was and nothing of Digest2 or key's is
	// left.
	Kept func(t *testing.T, f F, ref policy.Ref, key string)
	// Untouched checks what a refused pull (pull policy never) for job key
	// must not have done.
	Untouched func(t *testing.T, f F, key string)
	// Plant puts an image for ref at digest where the runtime would look
	// if it believed a tag record naming digest; nil for nothing.
	Plant func(t *testing.T, f F, ref policy.Ref, digest string)
}

// Failure is an expected failure: the test name and what the error says.
type Failure struct {
	Name, WantErr string
}

// key is the job key of the scenarios' job under test.
const key = "j42-build"

// unitRegistry is the registry of the images the runtimes' unit tests
// name without a fake registry (nothing answers there).
const unitRegistry = "127.0.0.1:5443"

// pinned is the tiny image on unitRegistry pinned at digest: pulled
// without asking a registry.
func pinned(t *testing.T, digest string) policy.Ref {
	return ParsedRef(t, unitRegistry+"/ci/tiny@"+digest)
}

// anon is an anonymous pull request of ref for job k.
func anon(f *Fake, ref policy.Ref, k, policy string) mechanism.PullRequest {
	return f.Request(ref, k, policy, auth.Credential{}, io.Discard)
}

// pullOK pulls req, which must succeed.
func pullOK(t *testing.T, f *Fake, req mechanism.PullRequest) mechanism.Image {
	t.Helper()
	img, err := f.Pull(req)
	require.NoError(t, err)
	return img
}

// FirstPull is the first pull of a job: the registry's image, behind the
// user's login, pulled by job k with the user's credential.
type FirstPull[F Rig] struct {
	Reg  *Registry
	F    F
	Ref  policy.Ref
	Cred auth.Credential
	Log  *bytes.Buffer
	Img  mechanism.Image
}

// PullFirst starts a registry that wants the user's password, installs
// the fake with hostEnv and pulls the registry's image for job k (as a
// single file when single): the tag is resolved and the image pulled
// once.
func (s Suite[F]) PullFirst(t *testing.T, hostEnv map[string]string, k string, single bool) FirstPull[F] {
	t.Helper()
	g := StartRegistry(t, s.Scheme)
	g.RequireLogin(s.Creds.User, s.Password)
	p := FirstPull[F]{Reg: g, F: s.Install(t, config.Mechanism{}, hostEnv), Ref: g.Ref(t),
		Cred: s.Creds.FromUser(t, g.Host, s.Password), Log: &bytes.Buffer{}}
	f := p.F.Shared()
	req := f.Request(p.Ref, k, config.PullAlways, p.Cred, p.Log)
	req.SingleFile = single
	p.Img = pullOK(t, f, req)
	assert.Equal(t, 1, g.Resolved(), "the tag was resolved with the user's credentials")
	assert.Equal(t, 1, f.Pulls(t))
	return p
}

// PullPinned pulls the tiny image pinned at digest on a registry that is
// down, for job k, after edit changed the request (nil for none): a
// pinned reference needs no registry.
func (s Suite[F]) PullPinned(t *testing.T, digest, k string, edit func(*mechanism.PullRequest)) (F, policy.Ref, mechanism.Image) {
	t.Helper()
	f := s.Install(t, config.Mechanism{}, nil)
	ref := ParsedRef(t, ClosedPort(t)+"/ci/tiny@"+digest)
	req := anon(f.Shared(), ref, k, config.PullAlways)
	if edit != nil {
		edit(&req)
	}
	img := pullOK(t, f.Shared(), req)
	assert.Equal(t, digest, img.Digest)
	return f, ref, img
}

// PullIfNotPresent: a stored image is used as it is, without asking the
// registry, even when the tag has moved; once it is gone, the tag is
// resolved and pulled anew.
func (s Suite[F]) PullIfNotPresent(t *testing.T) {
	g := StartRegistry(t, s.Scheme)
	rig := s.Install(t, config.Mechanism{}, nil)
	f := rig.Shared()
	ref := g.Ref(t)

	img := pullOK(t, f, anon(f, ref, "j1-first", config.PullIfNotPresent))
	assert.Equal(t, 1, g.Resolved(), "absent: resolved")
	assert.Equal(t, 1, f.Pulls(t), "absent: pulled")
	assert.Equal(t, "miss", img.Cache)

	// The tag moves in the registry; the stored image is used as is and
	// the registry is not asked.
	g.Set(TinyTag, Digest2)
	if s.Retag != nil {
		s.Retag(t, rig)
	}
	img = pullOK(t, f, anon(f, ref, "j2-second", config.PullIfNotPresent))
	assert.Equal(t, 1, g.Resolved(), "present: the registry is not asked")
	assert.Equal(t, 1, f.Pulls(t), "present: not pulled again")
	assert.Equal(t, Digest1, img.Digest)
	assert.Equal(t, "hit", img.Cache)
	s.Got(t, rig, ref, img, "j2-second", Digest1)

	// The recorded image is gone (evicted, removed by hand): resolved and
	// pulled anew.
	s.Remove(t, rig, ref, Digest1)
	img = pullOK(t, f, anon(f, ref, "j3-third", config.PullIfNotPresent))
	assert.Equal(t, 2, g.Resolved())
	assert.Equal(t, 2, f.Pulls(t))
	assert.Equal(t, Digest2, img.Digest)
	assert.Equal(t, Digest2, f.Store(t).Tag(ref.Full))
	s.Got(t, rig, ref, img, "j3-third", Digest2)
}

// FailedPullKeepsTheStoredImage: when the tag moved and pulling the new
// digest fails, the image stored before and the tag record stay as they
// were, so if-not-present jobs keep working.
func (s Suite[F]) FailedPullKeepsTheStoredImage(t *testing.T) {
	g := StartRegistry(t, s.Scheme)
	rig := s.Install(t, config.Mechanism{}, nil)
	f := rig.Shared()
	ref := g.Ref(t)
	pullOK(t, f, anon(f, ref, "j1-first", config.PullAlways))

	g.Set(TinyTag, Digest2)
	f.Set(t, "pull-fail", s.Refused)
	_, err := f.Pull(anon(f, ref, "j2-second", config.PullAlways))
	require.Error(t, err)
	assert.Equal(t, failure.System, failure.ClassOf(err))
	assert.Contains(t, err.Error(), "connection refused by")
	assert.Equal(t, Digest1, f.Store(t).Tag(ref.Full))
	s.Kept(t, rig, ref, "j2-second")

	img := pullOK(t, f, anon(f, ref, "j2-second", config.PullIfNotPresent))
	assert.Equal(t, Digest1, img.Digest)
	s.Got(t, rig, ref, img, "j2-second", Digest1)
}

// NeverCase is a pull with policy never that is refused although the
// store has something: Setup plants it for ref (a tag), or nil for the
// tiny image pinned at Digest1 and nothing in the store.
type NeverCase[F Rig] struct {
	Name  string
	Setup func(t *testing.T, f F, ref policy.Ref)
}

// PullNever: pull policy never uses what the store has, without asking a
// registry, and refuses everything else: no image, a tag record without
// its image, refused (the shared cases and the runtime's own).
func (s Suite[F]) PullNever(t *testing.T, refused ...NeverCase[F]) {
	t.Run("absent", func(t *testing.T) {
		g := StartRegistry(t, s.Scheme)
		rig := s.Install(t, config.Mechanism{}, nil)
		f := rig.Shared()
		img, err := f.Pull(f.Request(g.Ref(t), key, config.PullNever, s.Creds.FromUser(t, g.Host, s.Password), io.Discard))
		require.Error(t, err)
		assert.Equal(t, failure.User, failure.ClassOf(err), err.Error())
		assert.Contains(t, err.Error(), "not in your image store")
		assert.Contains(t, err.Error(), g.Ref(t).Full)
		assert.Empty(t, img.Handle)
		assert.Zero(t, g.Resolved(), "never: the registry is not asked")
		assert.Zero(t, f.Pulls(t), s.Tool+" not run")
		assert.NoFileExists(t, f.TagRecord(g.Ref(t)))
		f.AssertStoreClean(t)
		s.Untouched(t, rig, key)
	})
	t.Run("present", func(t *testing.T) {
		g := StartRegistry(t, s.Scheme)
		rig := s.Install(t, config.Mechanism{}, nil)
		f := rig.Shared()
		pullOK(t, f, anon(f, g.Ref(t), "j1-first", config.PullAlways))
		img := pullOK(t, f, anon(f, g.Ref(t), key, config.PullNever))
		assert.Equal(t, 1, g.Resolved())
		assert.Equal(t, 1, f.Pulls(t))
		assert.Equal(t, Digest1, img.Digest)
		assert.Equal(t, "hit", img.Cache)
		s.Got(t, rig, g.Ref(t), img, key, Digest1)
	})
	t.Run("pinned digest present", func(t *testing.T) {
		rig, ref, _ := s.PullPinned(t, Digest1, "j1-first", nil)
		f := rig.Shared()
		img := pullOK(t, f, anon(f, ref, key, config.PullNever))
		assert.Equal(t, 1, f.Pulls(t))
		assert.Equal(t, Digest1, img.Digest)
		s.Got(t, rig, ref, img, key, Digest1)
	})

	shared := []NeverCase[F]{
		{Name: "pinned digest absent"},
		{Name: "tag record without its " + s.Image, Setup: func(t *testing.T, f F, ref policy.Ref) {
			require.NoError(t, f.Shared().Store(t).SetTag(ref.Full, Digest1))
		}},
		{Name: "a tag record that is not a digest", Setup: func(t *testing.T, f F, ref policy.Ref) {
			const bad = "sha256:../../../etc/passwd"
			st := f.Shared().Store(t)
			require.NoError(t, st.SetTag(ref.Full, Digest1))
			record := f.Shared().TagRecord(ref)
			require.FileExists(t, record, "the test plants the record where the store keeps it")
			require.NoError(t, os.WriteFile(record, []byte(bad+"\n"), 0o600))
			require.Empty(t, st.Tag(ref.Full))
			if s.Plant != nil {
				s.Plant(t, f, ref, bad)
			}
		}},
	}
	for _, tt := range append(shared, refused...) {
		t.Run(tt.Name, func(t *testing.T) {
			rig := s.Install(t, config.Mechanism{}, nil)
			f := rig.Shared()
			ref := ParsedRef(t, unitRegistry+"/"+TinyTag)
			if tt.Setup == nil {
				ref = pinned(t, Digest1)
			} else {
				tt.Setup(t, rig, ref)
			}
			_, err := f.Pull(anon(f, ref, key, config.PullNever))
			require.Error(t, err)
			assert.Equal(t, failure.User, failure.ClassOf(err), err.Error())
			assert.Contains(t, err.Error(), "not in your image store")
			assert.Zero(t, f.Pulls(t))
			s.Untouched(t, rig, key)
		})
	}
}

// PullResolveFailures: a tag that cannot be resolved stops the pull before
// the pull program runs, with the same classes as a failed pull.
func (s Suite[F]) PullResolveFailures(t *testing.T) {
	names := s.Creds.Names
	anonymous := func(*testing.T, string) auth.Credential { return auth.Credential{} }
	tests := []struct {
		name    string
		login   bool // the registry wants the user's password
		cred    func(t *testing.T, host string) auth.Credential
		tag     string
		secure  bool // the registry is not listed as insecure
		down    bool
		class   failure.Class
		wantErr string
	}{
		{name: "anonymous, login needed", login: true, cred: anonymous,
			class: failure.User, wantErr: "set " + names.Username + " and " + names.Password},
		{name: "wrong password", login: true, cred: func(t *testing.T, h string) auth.Credential { return s.Creds.FromUser(t, h, "wrong-password-1") },
			class: failure.User, wantErr: "refused the credentials in " + names.Username + "/" + names.Password},
		{name: "job token refused", login: true, cred: func(t *testing.T, h string) auth.Credential { return s.Creds.JobToken(t, h, s.Token) },
			class: failure.System, wantErr: "job token"},
		{name: "unknown tag", cred: func(t *testing.T, h string) auth.Credential { return s.Creds.FromUser(t, h, s.Password) }, tag: "nope",
			class: failure.User, wantErr: `image not found, or access denied (tag "nope" of `},
		{name: s.NotListed.Name, cred: anonymous, secure: true, class: failure.System, wantErr: s.NotListed.WantErr},
		{name: "registry down", cred: anonymous, down: true, class: failure.System, wantErr: ": is the registry up?"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := StartRegistry(t, s.Scheme)
			if tt.login {
				g.RequireLogin(s.Creds.User, s.Password)
			}
			host := g.Host
			if tt.down {
				host = ClosedPort(t)
			}
			tag := "latest"
			if tt.tag != "" {
				tag = tt.tag
			}
			f := s.Install(t, config.Mechanism{}, nil).Shared()
			ref := ParsedRef(t, host+"/ci/tiny:"+tag)
			req := f.Request(ref, key, config.PullAlways, tt.cred(t, host), io.Discard)
			req.Insecure = !tt.secure
			req.SingleFile = s.SingleFile
			_, err := f.Pull(req)
			require.Error(t, err)
			assert.Equal(t, tt.class, failure.ClassOf(err), err.Error())
			assert.Contains(t, err.Error(), tt.wantErr)
			assert.Contains(t, err.Error(), ref.Full)
			if tt.down {
				assert.Contains(t, err.Error(), "connection refused by "+host+": is the registry up?")
				assert.NotContains(t, err.Error(), "HTTP response to HTTPS client", "not a plain-HTTP problem")
				assert.NotContains(t, err.Error(), "plain HTTP")
			}
			s.Secrets.AssertAbsent(t, "error", err.Error())
			assert.NotContains(t, err.Error(), "wrong-password-1")
			assert.Zero(t, f.Pulls(t), s.Tool+" not run")
			assert.NoFileExists(t, f.TagRecord(ref))
			f.AssertStoreClean(t)
		})
	}
}

// PullFailure is a pull of the tiny image pinned at Digest1 (no registry
// involved) that fails: Setup breaks the fake, the image or the storage.
type PullFailure[F Rig] struct {
	Name    string
	Setup   func(t *testing.T, f F)
	Cred    func(t *testing.T) auth.Credential
	Class   failure.Class
	WantErr string
	// Stored: the pulled image is kept in the store (it was found unusable
	// only afterwards).
	Stored bool
}

// RegistryFailures are the pull failures every runtime classifies alike:
// the registry refuses the user's credentials (the user's to fix, naming
// the variables) or the job token (the system's), or has no such image
// (the user's). refused and notFound are what the runtime's pull program
// prints then.
func (s Suite[F]) RegistryFailures(refused, notFound string) []PullFailure[F] {
	prints := func(out string) func(t *testing.T, f F) {
		return func(t *testing.T, f F) { f.Shared().Set(t, "pull-fail", out) }
	}
	names := s.Creds.Names
	return []PullFailure[F]{
		{Name: "registry refuses user credentials", Setup: prints(refused),
			Cred:  func(t *testing.T) auth.Credential { return s.Creds.FromUser(t, unitRegistry, s.Password) },
			Class: failure.User, WantErr: names.Username + "/" + names.Password},
		{Name: "registry refuses the job token", Setup: prints(refused),
			Cred:  func(t *testing.T) auth.Credential { return s.Creds.JobToken(t, unitRegistry, s.Token) },
			Class: failure.System, WantErr: "job token"},
		{Name: "image not found", Setup: prints(notFound), Cred: Anonymous, Class: failure.User, WantErr: "image not found"},
	}
}

// PullFailures runs each case, once for each of singleFile (named ",
// single file" when true): the pull fails as the case says, without a
// secret in the error or the job log; check looks at what is left.
func (s Suite[F]) PullFailures(t *testing.T, cases []PullFailure[F], singleFile []bool, check func(t *testing.T, f F, c PullFailure[F], ref policy.Ref, key string)) {
	for _, tt := range cases {
		for _, single := range singleFile {
			name := tt.Name
			if single {
				name += ", single file"
			}
			t.Run(name, func(t *testing.T) {
				rig := s.Install(t, config.Mechanism{}, nil)
				f := rig.Shared()
				tt.Setup(t, rig)
				var logBuf bytes.Buffer
				ref := pinned(t, Digest1)
				req := f.Request(ref, key, config.PullAlways, tt.Cred(t), &logBuf)
				req.SingleFile = single
				_, err := f.Pull(req)
				require.Error(t, err)
				assert.Equal(t, tt.Class, failure.ClassOf(err), err.Error())
				assert.Contains(t, err.Error(), tt.WantErr)
				s.Secrets.AssertAbsent(t, "error", err.Error())
				s.Secrets.AssertAbsent(t, "job log", logBuf.String())
				check(t, rig, tt, ref, key)
			})
		}
	}
}

// PullWithJobToken: the job token reaches the pull program in its
// environment only, and no secret is in its argv or the job log; check
// looks further.
func (s Suite[F]) PullWithJobToken(t *testing.T, check func(t *testing.T, f F)) {
	g := StartRegistry(t, s.Scheme)
	g.RequireLogin(auth.JobTokenUser, s.Token)
	rig := s.Install(t, config.Mechanism{}, nil)
	f := rig.Shared()
	var logBuf bytes.Buffer
	req := f.Request(g.Ref(t), key, config.PullAlways, s.Creds.JobToken(t, g.Host, s.Token), &logBuf)
	req.SingleFile = s.SingleFile
	pullOK(t, f, req)
	env := f.Lines(t, "pull-env")
	assert.Contains(t, env, s.Creds.Names.Username+"="+auth.JobTokenUser)
	assert.Contains(t, env, s.Creds.Names.Password+"="+s.Token)
	s.Secrets.AssertAbsent(t, "pull argv", f.Lines(t, "pull-argv")...)
	s.Secrets.AssertAbsent(t, "job log", logBuf.String())
	check(t, rig)
}

// PullAnonymously: an anonymous pull gives the pull program no
// credential variables, whatever the driver's environment (hostEnv) has;
// check looks further.
func (s Suite[F]) PullAnonymously(t *testing.T, hostEnv map[string]string, check func(t *testing.T, f F)) {
	g := StartRegistry(t, s.Scheme)
	rig := s.Install(t, config.Mechanism{}, hostEnv)
	f := rig.Shared()
	pullOK(t, f, anon(f, g.Ref(t), key, config.PullAlways))
	for _, kv := range f.Lines(t, "pull-env") {
		assert.False(t, strings.HasPrefix(kv, s.Creds.Names.Username+"="), kv)
		assert.False(t, strings.HasPrefix(kv, s.Creds.Names.Password+"="), kv)
	}
	check(t, rig)
}

// ConcurrentJobsPullOnce: jobs of the same user that need the same image
// at once (three) run the pull program once, as a single file when single:
// the pull is held (its fake waits on the FIFO Rec/pull-gate) until the two
// other jobs say in their logs that they wait for it. setup prepares the
// fake further (nil for nothing); caches are the cache states the jobs
// see, in any order (nil: not checked). It returns the fake and the jobs'
// images.
func (s Suite[F]) ConcurrentJobsPullOnce(t *testing.T, single bool, setup func(t *testing.T, f F), caches []string) (F, []mechanism.Image) {
	g := StartRegistry(t, s.Scheme)
	rig := s.Install(t, config.Mechanism{}, nil)
	f := rig.Shared()
	gate := filepath.Join(f.Rec, "pull-gate")
	require.NoError(t, syscall.Mkfifo(gate, 0o600))
	if setup != nil {
		setup(t, rig)
	}
	ref := g.Ref(t)
	keys := []string{"j1-a", "j2-b", "j3-c"}
	imgs := make([]mechanism.Image, len(keys))
	errs := make([]error, len(keys))
	logs := make([]*LogWatch, len(keys))
	var wg sync.WaitGroup
	for i, k := range keys {
		logs[i] = &LogWatch{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			req := f.Request(ref, k, config.PullAlways, auth.Credential{}, logs[i])
			req.SingleFile = single
			imgs[i], errs[i] = f.Pull(req)
		}()
	}
	// Two jobs wait (for the pull, or for a build slot): then the pull
	// may end.
	seen := make([]<-chan struct{}, len(keys))
	for i := range logs {
		seen[i] = logs[i].Seen("Waiting: ")
	}
	timeout := time.After(time.Minute)
	for waiting := 0; waiting < 2; {
		select {
		case <-seen[0]:
			seen[0] = nil
		case <-seen[1]:
			seen[1] = nil
		case <-seen[2]:
			seen[2] = nil
		case <-timeout:
			t.Fatalf("two jobs did not say they wait; their logs:\n%s\n%s\n%s", logs[0], logs[1], logs[2])
		}
		waiting++
	}
	release(t, gate)
	wg.Wait()
	var got []string
	for i, k := range keys {
		require.NoError(t, errs[i])
		assert.Equal(t, Digest1, imgs[i].Digest)
		if !single {
			s.Got(t, rig, ref, imgs[i], k, Digest1)
		}
		got = append(got, imgs[i].Cache)
	}
	assert.Equal(t, 1, f.Pulls(t), "pulled once")
	if caches != nil {
		assert.ElementsMatch(t, caches, got)
	}
	return rig, imgs
}

// release lets the fake program waiting on the FIFO gate go on: opening
// it for writing waits for the program to open it for reading.
func release(t *testing.T, gate string) {
	t.Helper()
	opened := make(chan error, 1)
	go func() {
		w, err := os.OpenFile(gate, os.O_WRONLY, 0)
		if err == nil {
			_, err = w.WriteString("go\n")
			if cerr := w.Close(); err == nil {
				err = cerr
			}
		}
		opened <- err
	}()
	select {
	case err := <-opened:
		require.NoError(t, err)
	case <-time.After(time.Minute):
		t.Fatal("the pull program never waited on " + gate)
	}
}
