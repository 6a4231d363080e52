// Package imagecache is one user's content-addressed store of image files
// (SquashFS, SIF), keyed by the image's manifest digest: the second job on
// an image finds it ready, concurrent jobs that need the same image build
// it once (single flight on a file lock), a build killed half-way leaves
// nothing a later job would use (temporary file, then rename), a damaged
// entry is detected and rebuilt, and eviction by size and age never removes
// an image a job still uses.
//
// Trust model (docs/image-cache.md): the store belongs to one user, in a
// directory only that user can enter (0700, refused if it is a symlink or
// another user's). ci-exec runs as the job user, so nobody but that user
// (and root) can put anything in it: no user can plant an image that
// another user's job runs. Sharing converted images between users would
// need a trusted writer, which an unprivileged driver is not.
//
// Layout under Root:
//
//	entries/KEY        published images (never modified in place)
//	entries/KEY.meta   facts found when it was built (e.g. its shell)
//	tags/NAME          the digest a tag pointed to at its last pull
//	refs/KEY/JOB       one marker per job using KEY (removed at cleanup)
//	locks/             flock files: one per key, the conversion slots
//	tmp/               builds in progress
//
// Locks are flock(2) locks, which the kernel drops when their holder dies.
// On NFS the Linux client emulates them with whole-file POSIX locks (since
// 2.6.12), which work across clients with NFSv4 or NFSv3 with its lock
// service, and are local to one client with -o nolock or local_lock; on
// Lustre they work across clients only with -o flock (localflock makes
// them local, and without either flock(2) fails with ENOSYS). A store
// whose file system refuses locks is refused with an error naming the
// mount option (ErrNoLocks), never used without them.
package imagecache

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/gofrs/flock"

	"github.com/ci-exec/ci-exec/internal/atomicfile"
	"github.com/ci-exec/ci-exec/internal/owndir"
)

// Limits are the admin's settings.
type Limits struct {
	// MaxBytes is the total size entries may take (0: no limit).
	MaxBytes int64
	// MaxAge evicts entries unused for longer (0: never by age).
	MaxAge time.Duration
	// MaxBuilds caps concurrent builds (pulls and conversions) of this
	// user's jobs (0: 2).
	MaxBuilds int
	// EntrySize, when set, is the size an entry stands for, counted against
	// MaxBytes instead of its own size: a runtime whose images live in its
	// own storage (Podman) publishes a small record per image that names
	// the image and its size.
	EntrySize func(path string) int64
}

// Store is one user's store.
type Store struct {
	Root   string
	Limits Limits
}

// staleRef is when a job's use marker no longer protects an entry: a job
// that never reached cleanup (its machine died) must not pin it forever.
const staleRef = 7 * 24 * time.Hour

var subdirs = []string{"entries", "tags", "refs", "locks", "tmp"}

// Open makes the store's directories (0700) and checks that the root is
// the calling user's own.
func Open(root string, l Limits) (*Store, error) {
	if err := os.MkdirAll(filepath.Dir(root), 0o700); err != nil {
		return nil, fmt.Errorf("image store %s: %w", root, err)
	}
	// Refused unless it is the calling user's own, closed to others.
	if err := owndir.Private(root); err != nil {
		return nil, fmt.Errorf("image store: %w; remove it", err)
	}
	for _, d := range subdirs {
		if err := os.MkdirAll(filepath.Join(root, d), 0o700); err != nil {
			return nil, fmt.Errorf("image store %s: %w", root, err)
		}
	}
	if l.MaxBuilds <= 0 {
		l.MaxBuilds = 2
	}
	st := &Store{Root: root, Limits: l}
	if err := st.checkLocks(); err != nil {
		return nil, err
	}
	return st, nil
}

// ErrNoLocks is (wrapped in) the error for a store whose file system
// refuses file locks: single flight, eviction and the build cap all rest
// on them.
var ErrNoLocks = errors.New("its file system refuses file locks")

// lockErr turns a failed lock call into an error (see LockError).
func (s *Store) lockErr(name string, err error) error {
	return LockError("image store "+s.Root, "flock "+name, err)
}

// LockError turns a failed lock call on what (a lock of where) into an
// error; one that says the file system does not lock (Lustre without -o
// flock: ENOSYS; NFSv3 without its lock service: ENOLCK; some FUSE file
// systems: EOPNOTSUPP) wraps ErrNoLocks and names the fix.
func LockError(where, what string, err error) error {
	if errors.Is(err, syscall.ENOLCK) || errors.Is(err, syscall.ENOSYS) || errors.Is(err, syscall.EOPNOTSUPP) {
		return fmt.Errorf("%s: %w (%s: %w); on Lustre mount it with -o flock, on NFS use NFSv4 or NFSv3 with its lock service (not -o nolock), or set image_storage_dir to a local file system",
			where, ErrNoLocks, what, err)
	}
	return fmt.Errorf("%s: %s: %w", where, what, err)
}

// checkLocks takes and drops a shared lock, so that a store on a file
// system without locks is refused before any job relies on them.
func (s *Store) checkLocks() error {
	l := flock.New(filepath.Join(s.Root, "locks", "check.lock"), flock.SetPermissions(0o600))
	if _, err := l.TryRLock(); err != nil {
		return s.lockErr("check", err)
	}
	return l.Unlock()
}

// Trace receives, for one job, what the store does that its log should
// tell (see WithTrace).
type Trace struct {
	// Waiting is called when the job starts waiting for another job of the
	// same user; reason says for what ("another job of yours is building
	// this image").
	Waiting func(reason string)
}

type traceKey struct{}

// WithTrace returns a context whose store calls report to t.
func WithTrace(ctx context.Context, t Trace) context.Context {
	return context.WithValue(ctx, traceKey{}, t)
}

func waiting(ctx context.Context, reason string) {
	if t, ok := ctx.Value(traceKey{}).(Trace); ok && t.Waiting != nil {
		t.Waiting(reason)
	}
}

var keyRE = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^[a-z0-9][a-z0-9._-]*$`) })

// CheckKey refuses keys that are not plain file names.
func CheckKey(key string) error {
	if len(key) > 200 || !keyRE().MatchString(key) || strings.Contains(key, "..") {
		return fmt.Errorf("image store: invalid key %q", key)
	}
	return nil
}

// Path is where the entry key is published.
func (s *Store) Path(key string) string { return filepath.Join(s.Root, "entries", key) }

// Result says how Ensure found the entry.
type Result struct {
	Path string
	// Lease is the job's use marker on the entry (see Use).
	Lease string
	// Hit is true when the entry was there already; Waited when another
	// job built it while this one waited for the lock.
	Hit, Waited bool
	// BuildTime is the time spent building (0 on a hit).
	BuildTime time.Duration
	// Damaged is why the entry that was there failed its check and was
	// rebuilt (nil when it was not).
	Damaged error
}

// Ensure returns the valid entry key with a lease for job on it, building
// the entry when missing or damaged. Only one job builds a key at a time;
// the others wait for its lock and then find it built. build writes the
// complete file to tmp (in the store, so the rename that publishes it is
// atomic); valid checks an existing entry (a truncated file, say, is
// rebuilt).
//
// The lease is taken first, and an existing entry is checked under a
// shared lock on the key, which eviction (holding it exclusively while it
// removes an entry that has no lease) cannot share: so an entry Ensure
// returns cannot be evicted under the job.
func (s *Store) Ensure(ctx context.Context, key, job string, valid func(path string) error, build func(ctx context.Context, tmp string) error) (res Result, err error) {
	res = Result{Path: s.Path(key)}
	if err := CheckKey(key); err != nil {
		return res, err
	}
	if res.Lease, err = s.Use(key, job); err != nil {
		return res, err
	}
	defer func() {
		if err != nil {
			_ = s.Release(res.Lease)
			res.Lease = ""
		}
	}()
	shared := flock.New(filepath.Join(s.Root, "locks", "key-"+key+".lock"), flock.SetPermissions(0o600))
	ok, lerr := shared.TryRLock()
	if lerr == nil && !ok {
		res.Waited = true // a build of this key is running
		waiting(ctx, "another job of yours is building this image")
		ok, lerr = shared.TryRLockContext(ctx, lockRetry)
	}
	if lerr != nil || !ok {
		if lerr == nil {
			lerr = ctx.Err()
		}
		return res, s.lockErr(key, lerr)
	}
	hit := valid(res.Path) == nil
	_ = shared.Unlock()
	if hit {
		res.Hit = true
		s.touch(res.Path)
		return res, nil
	}
	unlock, waited, err := s.lock(ctx, "key-"+key, "another job of yours is building this image")
	if err != nil {
		return res, err
	}
	defer unlock()
	waited = waited || res.Waited
	invalid := valid(res.Path)
	if invalid == nil {
		res.Hit, res.Waited = true, waited
		s.touch(res.Path)
		return res, nil
	}
	if _, statErr := os.Lstat(res.Path); statErr == nil {
		// Damaged (truncated, not an image): rebuilt below.
		res.Damaged = invalid
		if err := os.Remove(res.Path); err != nil {
			return res, fmt.Errorf("remove the damaged image %s (%v): %w", res.Path, invalid, err)
		}
	}
	// Leftovers of a build that was killed (we hold the key's lock, so no
	// build of this key is running).
	s.removeTemps(key)
	release, err := s.BuildSlot(ctx)
	if err != nil {
		return res, err
	}
	defer release()
	start := time.Now()
	tmp := filepath.Join(s.Root, "tmp", fmt.Sprintf("%s.%d.tmp", key, os.Getpid()))
	defer os.RemoveAll(tmp)
	if err := build(ctx, tmp); err != nil {
		_ = os.Remove(res.Path + ".meta")
		return res, err
	}
	if err := valid(tmp); err != nil {
		_ = os.Remove(res.Path + ".meta")
		return res, fmt.Errorf("the built image is not valid: %w", err)
	}
	if err := atomicfile.Publish(tmp, res.Path); err != nil {
		return res, err
	}
	res.BuildTime = time.Since(start)
	return res, nil
}

func (s *Store) removeTemps(key string) {
	matches, _ := filepath.Glob(filepath.Join(s.Root, "tmp", key+".*"))
	for _, m := range matches {
		_ = os.RemoveAll(m)
	}
}

// touch records a use (eviction by age goes by modification time).
func (s *Store) touch(path string) {
	now := time.Now()
	_ = os.Chtimes(path, now, now)
}

// lockRetry is how often a busy lock is tried again.
const lockRetry = 100 * time.Millisecond

// lock takes the exclusive file lock name, waiting while another job holds
// it (reason says what that job does, for Trace); waited says whether it
// had to. The kernel drops the lock when the holder dies, so a killed job
// never blocks the others.
func (s *Store) lock(ctx context.Context, name, reason string) (unlock func(), waited bool, err error) {
	l := flock.New(filepath.Join(s.Root, "locks", name+".lock"), flock.SetPermissions(0o600))
	ok, err := l.TryLock()
	if err == nil && !ok {
		waited = true
		waiting(ctx, reason)
		ok, err = l.TryLockContext(ctx, lockRetry)
	}
	if err != nil || !ok {
		if err == nil {
			err = ctx.Err()
		}
		return nil, waited, s.lockErr(name, err)
	}
	return func() { _ = l.Unlock() }, waited, nil
}

// BuildSlot takes one of MaxBuilds slots (max_concurrent_builds), waiting
// while this user's other jobs hold all of them. Ensure takes one for its
// build; runtimes take one for other heavy work (a pull into their own
// storage, a full copy of an image), never while holding one already.
//
// Lock order, so that no two jobs wait for each other: an entry's lock,
// then a slot, then a named lock (Lock); never a slot while holding a
// named lock, never two slots at once.
func (s *Store) BuildSlot(ctx context.Context) (release func(), err error) {
	for told := false; ; told = true {
		for i := 0; i < s.Limits.MaxBuilds; i++ {
			l := flock.New(filepath.Join(s.Root, "locks", fmt.Sprintf("build-slot-%d.lock", i)), flock.SetPermissions(0o600))
			ok, err := l.TryLock()
			if err != nil {
				return nil, s.lockErr(fmt.Sprintf("build slot %d", i), err)
			}
			if ok {
				return func() { _ = l.Unlock() }, nil
			}
		}
		if !told {
			waiting(ctx, fmt.Sprintf("a build slot (your other jobs are running %d pulls or conversions, the max_concurrent_builds limit)", s.Limits.MaxBuilds))
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(lockRetry):
		}
	}
}

// Lock takes a named exclusive lock in the store (for work outside
// Ensure that must not run twice at once, such as a runtime's own pull);
// reason says, for Trace, what a job waiting for it waits for ("another
// job of yours is pulling this image").
func (s *Store) Lock(ctx context.Context, name, reason string) (unlock func(), err error) {
	if err := CheckKey(name); err != nil {
		return nil, err
	}
	unlock, _, err = s.lock(ctx, "name-"+name, reason)
	return unlock, err
}

// tagName is the flat file name of a reference's tag record, made with
// characters no reference contains, so two references never share one.
func tagName(ref string) string {
	return strings.NewReplacer("/", "%", ":", "+", "@", "=").Replace(ref)
}

var digestRE = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^sha256:[a-f0-9]{64}$`) })

// Tag returns the digest ref pointed to at its last recorded pull ("" if
// none).
func (s *Store) Tag(ref string) string {
	b, err := os.ReadFile(filepath.Join(s.Root, "tags", tagName(ref)))
	if d := strings.TrimSpace(string(b)); err == nil && digestRE().MatchString(d) {
		return d
	}
	return ""
}

// SetTag records the digest ref points to.
func (s *Store) SetTag(ref, digest string) error {
	if !digestRE().MatchString(digest) {
		return fmt.Errorf("not a sha256 digest: %q", digest)
	}
	return atomicfile.Write(filepath.Join(s.Root, "tags", tagName(ref)), []byte(digest+"\n"), 0o600)
}

// Meta returns a fact recorded with an entry ("" if none).
func (s *Store) Meta(key, name string) string {
	b, err := os.ReadFile(s.Path(key) + ".meta")
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok && k == name {
			return v
		}
	}
	return ""
}

// SetMeta records a fact with an entry.
func (s *Store) SetMeta(key, name, value string) error {
	if name == "" || strings.Contains(name, "=") || strings.ContainsAny(name+value, "\n") {
		return fmt.Errorf("bad meta %q=%q", name, value)
	}
	lines := []string{}
	if b, err := os.ReadFile(s.Path(key) + ".meta"); err == nil {
		for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
			if k, _, ok := strings.Cut(l, "="); ok && k != name {
				lines = append(lines, l)
			}
		}
	}
	lines = append(lines, name+"="+value)
	return atomicfile.Write(s.Path(key)+".meta", []byte(strings.Join(lines, "\n")+"\n"), 0o600)
}

// Use records that job uses entry key until Release of the returned lease
// (a marker file; eviction leaves the entry alone while it exists).
func (s *Store) Use(key, job string) (lease string, err error) {
	if err := CheckKey(key); err != nil {
		return "", err
	}
	if err := CheckKey(job); err != nil {
		return "", err
	}
	dir := filepath.Join(s.Root, "refs", key)
	lease = filepath.Join(dir, job)
	// Release removes refs/KEY when it drops the last lease, which can be
	// between this job's mkdir and its write: then the directory is made
	// again. Once the lease exists the directory is not empty and stays.
	// (os.Mkdir, not MkdirAll: MkdirAll fails when the directory it found
	// existing is removed before it checks it.)
	for tries := 0; ; tries++ {
		if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
			return "", err
		}
		testHookUse()
		err = os.WriteFile(lease, nil, 0o600)
		if err == nil || !errors.Is(err, fs.ErrNotExist) || tries == 100 {
			return lease, err
		}
	}
}

// testHookUse runs between Use's mkdir and its write (tests only).
var testHookUse = func() {}

// CheckLease reports whether lease is a path Use returns: refs/KEY/JOB
// under the store, both parts valid keys. Release checks it, and so do the
// runtimes for a lease read back from a job's state.
func (s *Store) CheckLease(lease string) error {
	rel, err := filepath.Rel(filepath.Join(s.Root, "refs"), filepath.Clean(lease))
	parts := strings.Split(rel, string(filepath.Separator))
	if err != nil || len(parts) != 2 || CheckKey(parts[0]) != nil || CheckKey(parts[1]) != nil {
		return fmt.Errorf("not a lease of the image store %s: %s", s.Root, lease)
	}
	return nil
}

// Release ends a lease returned by Use. A path that is not a lease of
// this store is refused.
func (s *Store) Release(lease string) error {
	if err := s.CheckLease(lease); err != nil {
		return err
	}
	if err := os.Remove(lease); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	_ = os.Remove(filepath.Dir(lease)) // when it was the last one
	return nil
}

// inUse reports whether a job holds a lease on key, dropping leases too old
// to be real.
func (s *Store) inUse(key string, now time.Time) bool {
	dir := filepath.Join(s.Root, "refs", key)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return false
	}
	used := false
	for _, e := range ents {
		fi, err := e.Info()
		if err != nil {
			continue
		}
		if now.Sub(fi.ModTime()) > staleRef {
			_ = os.Remove(filepath.Join(dir, e.Name()))
			continue
		}
		used = true
	}
	return used
}

// Evicted is one removed entry.
type Evicted struct {
	Key    string
	Size   int64
	Reason string
}

// Evict removes entries unused for longer than MaxAge, then the least
// recently used ones until the total is within MaxBytes. Entries with a
// lease are never removed, and an entry being built or rebuilt (its key
// locked) is skipped. Only one eviction runs at a time.
func (s *Store) Evict(ctx context.Context, now time.Time) ([]Evicted, error) {
	if s.Limits.MaxBytes <= 0 && s.Limits.MaxAge <= 0 {
		return nil, nil
	}
	l := flock.New(filepath.Join(s.Root, "locks", "evict.lock"), flock.SetPermissions(0o600))
	if ok, err := l.TryLock(); err != nil || !ok {
		return nil, err // another job is evicting
	}
	defer l.Unlock()
	type entry struct {
		key  string
		size int64
		used time.Time
	}
	ents, err := os.ReadDir(filepath.Join(s.Root, "entries"))
	if err != nil {
		return nil, err
	}
	var all []entry
	var total int64
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".meta") {
			continue
		}
		fi, err := e.Info()
		if err != nil {
			continue
		}
		size := fi.Size()
		switch {
		case s.Limits.EntrySize != nil:
			size = s.Limits.EntrySize(s.Path(e.Name()))
		case fi.IsDir():
			size = dirSize(s.Path(e.Name()))
		}
		all = append(all, entry{key: e.Name(), size: size, used: fi.ModTime()})
		total += size
	}
	sort.Slice(all, func(i, j int) bool { return all[i].used.Before(all[j].used) })
	var out []Evicted
	remove := func(e entry, why string) bool {
		if s.inUse(e.key, now) {
			return false
		}
		// Not while a job (re)builds or is about to use it.
		lk := flock.New(filepath.Join(s.Root, "locks", "key-"+e.key+".lock"), flock.SetPermissions(0o600))
		if ok, err := lk.TryLock(); err != nil || !ok {
			return false
		}
		defer lk.Unlock()
		if s.inUse(e.key, now) {
			return false
		}
		if err := os.RemoveAll(s.Path(e.key)); err != nil {
			return false
		}
		_ = os.Remove(s.Path(e.key) + ".meta")
		out = append(out, Evicted{Key: e.key, Size: e.size, Reason: why})
		total -= e.size
		return true
	}
	var keep []entry
	for _, e := range all {
		if ctx.Err() != nil {
			return out, ctx.Err()
		}
		if s.Limits.MaxAge > 0 && now.Sub(e.used) > s.Limits.MaxAge && remove(e, "unused for "+now.Sub(e.used).Round(time.Second).String()) {
			continue
		}
		keep = append(keep, e)
	}
	for _, e := range keep {
		if s.Limits.MaxBytes <= 0 || total <= s.Limits.MaxBytes {
			break
		}
		remove(e, "over the size limit")
	}
	return out, nil
}

func dirSize(dir string) int64 {
	var n int64
	_ = filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			if fi, err := d.Info(); err == nil {
				n += fi.Size()
			}
		}
		return nil
	})
	return n
}
