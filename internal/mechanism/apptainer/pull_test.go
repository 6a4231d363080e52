package apptainer

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/mechanism/mechtest"
)

// TestTagRecordsTellImagesApart: two different references must never
// share a tag record, or a job with pull policy if-not-present or never may
// run the image another reference named.
func TestTagRecordsTellImagesApart(t *testing.T) {
	pairs := []struct {
		name string
		a, b string
	}{
		{"tag and path", "example.com/a:b", "example.com/a/b"},
		{"port and tag", "example.com:5000/a", "example.com/5000/a:latest"},
		{"tag and digest", "example.com/a:latest", "example.com/a@sha256:" + strings.Repeat("0", 64)},
		{"underscore and slash in the path", "example.com/a_b/c:1", "example.com/a/b_c:1"},
		{"registries", "example.com/a:1", "example.org/a:1"},
	}
	for _, p := range pairs {
		t.Run(p.name, func(t *testing.T) {
			a, b := mechtest.ParsedRef(t, p.a), mechtest.ParsedRef(t, p.b)
			require.NotEqual(t, a.Full, b.Full)
			st, err := runtimeFor(config.Mechanism{ImageStorageDir: t.TempDir()}, nil).Store()
			require.NoError(t, err)
			require.NoError(t, st.SetTag(a.Full, mechtest.Digest1))
			require.NoError(t, st.SetTag(b.Full, mechtest.Digest2))
			assert.Equal(t, mechtest.Digest1, st.Tag(a.Full))
			assert.Equal(t, mechtest.Digest2, st.Tag(b.Full))
		})
	}
}

func TestPullArgv(t *testing.T) {
	sys := mechanism.Info{Programs: map[string]string{"apptainer": "/usr/bin/apptainer"}}
	app := mechanism.Info{Programs: map[string]string{"apptainer": "/opt/apptainer/bin/apptainer"}}
	const out = "/var/tmp/ciuser.ci-exec/apptainer/tmp/sha256-x.sif.4242.tmp"
	digest := "sha256:" + strings.Repeat("d1", 32)
	pinned := "docker://127.0.0.1:5443/ci/tiny@" + digest
	tests := []struct {
		name     string
		info     mechanism.Info
		cred     func(*testing.T) auth.Credential
		insecure bool
		want     []string
	}{
		{"anonymous", sys, mechtest.Anonymous, false,
			[]string{"/usr/bin/apptainer", "pull", "--force", out, pinned}},
		{"user credential", sys, aliceCred, false,
			[]string{"/usr/bin/apptainer", "pull", "--force", out, pinned}},
		{"job token", sys, tokenCred, false,
			[]string{"/usr/bin/apptainer", "pull", "--force", out, pinned}},
		{"insecure registry", sys, aliceCred, true,
			[]string{"/usr/bin/apptainer", "pull", "--force", "--no-https", out, pinned}},
		{"application_path", app, mechtest.Anonymous, true,
			[]string{"/opt/apptainer/bin/apptainer", "pull", "--force", "--no-https", out, pinned}},
		{"program unknown", mechanism.Info{}, mechtest.Anonymous, false,
			[]string{"apptainer", "pull", "--force", out, pinned}},
	}
	r := runtimeFor(config.Mechanism{}, nil)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ref := mechtest.ParsedRef(t, tinyImage)
			req := mechanism.PullRequest{Ref: ref, Credential: tt.cred(t), Insecure: tt.insecure, JobKey: jobKey}
			argv := r.pullArgv(tt.info, req, ref.AtDigest(digest), out)
			assert.Equal(t, tt.want, argv)
			secrets.AssertAbsent(t, "pull argv", argv...)
			for _, a := range argv {
				assert.NotContains(t, a, "alice", "no username on the command line either")
			}
		})
	}
}

func TestToolEnv(t *testing.T) {
	host := map[string]string{
		"https_proxy":        "http://proxy:3128",
		"HTTP_PROXY":         "http://proxy:3128",
		"NO_PROXY":           "localhost,127.0.0.1",
		"SSL_CERT_FILE":      "/etc/ssl/ca.pem",
		"REQUESTS_CA_BUNDLE": "/etc/ssl/ca.pem",
	}
	for k, v := range hostileHostEnv {
		if _, ok := host[k]; !ok && strings.ToLower(k) != "https_proxy" && k != "NO_PROXY" {
			host[k] = v
		}
	}
	network := []string{"https_proxy=http://proxy:3128", "HTTP_PROXY=http://proxy:3128", "NO_PROXY=localhost,127.0.0.1",
		"REQUESTS_CA_BUNDLE=/etc/ssl/ca.pem", "SSL_CERT_FILE=/etc/ssl/ca.pem"}
	identity := func(path string) []string {
		return []string{"PATH=" + path, "HOME=/home/ciuser", "USER=ciuser", "LOGNAME=ciuser", "LANG=C.UTF-8"}
	}
	dirs := func(cache, tmp string) []string {
		return []string{"APPTAINER_CACHEDIR=" + cache, "APPTAINER_TMPDIR=" + tmp}
	}
	join := slices.Concat[[]string]
	inStorage := dirs("/scratch/ciuser.apptainer/cache", "/scratch/ciuser.apptainer/tmp")

	tests := []struct {
		name    string
		cfg     config.Mechanism
		hostEnv map[string]string
		cred    func(*testing.T) auth.Credential
		want    []string
	}{
		{"anonymous", config.Mechanism{ImageStorageDir: "/scratch"}, host, mechtest.Anonymous,
			join(identity(toolPath), inStorage, network)},
		{"user credential", config.Mechanism{ImageStorageDir: "/scratch"}, host, aliceCred,
			join(identity(toolPath), inStorage, network,
				[]string{"APPTAINER_DOCKER_USERNAME=alice", "APPTAINER_DOCKER_PASSWORD=" + alicePass})},
		{"job token", config.Mechanism{ImageStorageDir: "/scratch"}, host, tokenCred,
			join(identity(toolPath), inStorage, network,
				[]string{"APPTAINER_DOCKER_USERNAME=gitlab-ci-token", "APPTAINER_DOCKER_PASSWORD=" + tokenValue})},
		{"default storage", config.Mechanism{}, nil, mechtest.Anonymous,
			join(identity(toolPath), dirs("/var/tmp/ciuser.apptainer/cache", "/var/tmp/ciuser.apptainer/tmp"))},
		{"cache_dir and tmp_dir", config.Mechanism{ImageStorageDir: "/scratch", CacheDir: "/cache", TmpDir: "/fast/tmp/"}, nil, mechtest.Anonymous,
			join(identity(toolPath), dirs("/cache/ciuser", "/fast/tmp/ciuser"))},
		{"cache_dir only", config.Mechanism{ImageStorageDir: "/scratch", CacheDir: "/cache"}, nil, mechtest.Anonymous,
			join(identity(toolPath), dirs("/cache/ciuser", "/scratch/ciuser.apptainer/tmp"))},
		{"application_path first in PATH", config.Mechanism{ImageStorageDir: "/scratch", ApplicationPath: "/opt/apptainer/bin"}, nil, mechtest.Anonymous,
			join(identity("/opt/apptainer/bin:"+toolPath), inStorage)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cred := tt.cred(t)
			got := runtimeFor(tt.cfg, tt.hostEnv).toolEnv(cred)
			assert.Equal(t, tt.want, got)
			for _, kv := range got {
				for _, p := range forbiddenEnvPrefixes {
					assert.False(t, strings.HasPrefix(kv, p), "host variable %s reached apptainer pull", kv)
				}
			}
			secrets.AssertCarriedIn(t, got, cred, "APPTAINER_DOCKER_PASSWORD")
		})
	}
}

// FATAL lines as Apptainer 1.5.3 prints them for docker:// pulls.
const (
	fatalFetch     = "FATAL:   While making image from oci registry: error fetching image: "
	tailAuth       = "INFO:    Converting OCI blobs to SIF format\n" + fatalFetch + "failed to get checksum for docker://127.0.0.1:5443/ci/tiny:latest: reading manifest latest in 127.0.0.1:5443/ci/tiny: authentication required\n"
	tailUnauth     = fatalFetch + "reading manifest latest in 127.0.0.1:5443/ci/tiny: unauthorized: authentication required\n"
	tailManifest   = fatalFetch + "reading manifest nope in 127.0.0.1:5443/ci/tiny: manifest unknown\n"
	tailName       = fatalFetch + "reading manifest latest in 127.0.0.1:5443/ci/none: name unknown: repository name not known to registry\n"
	tailPlainHTTP  = fatalFetch + `failed to get checksum for docker://127.0.0.1:5000/ci/tiny:latest: pinging container registry 127.0.0.1:5000: Get "https://127.0.0.1:5000/v2/": http: server gave HTTP response to HTTPS client` + "\n"
	tailX509       = fatalFetch + `pinging container registry 127.0.0.1:5443: Get "https://127.0.0.1:5443/v2/": tls: failed to verify certificate: x509: certificate signed by unknown authority` + "\n"
	tailRefused    = fatalFetch + `pinging container registry 127.0.0.1:5999: Get "https://127.0.0.1:5999/v2/": dial tcp 127.0.0.1:5999: connect: connection refused` + "\n"
	tailNoHost     = fatalFetch + `pinging container registry registry.invalid: Get "https://registry.invalid/v2/": dial tcp: lookup registry.invalid on 127.0.0.53:53: no such host` + "\n"
	tailTimeout    = fatalFetch + `pinging container registry 10.0.0.1:5443: Get "https://10.0.0.1:5443/v2/": dial tcp 10.0.0.1:5443: i/o timeout` + "\n"
	tailNoSpace    = "FATAL:   While making image from oci registry: while building SIF from layers: unable to create new build: write /scratch/ciuser.apptainer/tmp/build-temp-1/rootfs/x: no space left on device\n"
	tailUnknown    = "INFO:    Converting OCI blobs to SIF format\nFATAL:   While making image from oci registry: something entirely new\n"
	tailNoFatal    = "INFO:    Converting OCI blobs to SIF format\nKilled\n"
	storageForTest = "/scratch/ciuser.apptainer"
)

func TestClassifyPull(t *testing.T) {
	tests := []struct {
		name  string
		cred  func(*testing.T) auth.Credential
		tail  string
		class failure.Class
		want  []string
	}{
		{"auth required, user credentials", aliceCred, tailAuth, failure.User,
			[]string{tinyImage, "APPTAINER_DOCKER_USERNAME/APPTAINER_DOCKER_PASSWORD", "user alice"}},
		{"auth required, job token", tokenCred, tailAuth, failure.System, []string{tinyImage, "job token", "retry"}},
		{"auth required, anonymous", mechtest.Anonymous, tailAuth, failure.User,
			[]string{tinyImage, "image not found", "set APPTAINER_DOCKER_USERNAME and APPTAINER_DOCKER_PASSWORD"}},
		{"unauthorized, user credentials", aliceCred, tailUnauth, failure.User, []string{"refused the credentials"}},
		{"unauthorized, job token", tokenCred, tailUnauth, failure.System, []string{"job token"}},
		{"manifest unknown, anonymous", mechtest.Anonymous, tailManifest, failure.User, []string{tinyImage, "image not found", `tag "latest" of `}},
		{"manifest unknown, user credentials", aliceCred, tailManifest, failure.User, []string{"image not found"}},
		{"manifest unknown, job token", tokenCred, tailManifest, failure.User, []string{"job token may read it"}},
		{"name unknown", mechtest.Anonymous, tailName, failure.User, []string{"image not found"}},
		{"plain HTTP registry", mechtest.Anonymous, tailPlainHTTP, failure.System,
			[]string{"plain HTTP", "insecure_registries", "server gave HTTP response to HTTPS client"}},
		{"plain HTTP registry with credentials", aliceCred, tailPlainHTTP, failure.System, []string{"insecure_registries"}},
		{"untrusted certificate", mechtest.Anonymous, tailX509, failure.System,
			[]string{"TLS certificate", "insecure_registries", "x509: certificate signed by unknown authority"}},
		{"registry down", aliceCred, tailRefused, failure.System, []string{tinyImage, "connection refused by 127.0.0.1:5999: is the registry up?"}},
		{"no such host", mechtest.Anonymous, tailNoHost, failure.System, []string{"unreachable", "no such host"}},
		{"timeout", mechtest.Anonymous, tailTimeout, failure.System, []string{"unreachable", "i/o timeout"}},
		{"disk full", mechtest.Anonymous, tailNoSpace, failure.System, []string{storageForTest, "no space left on device"}},
		{"unknown FATAL", aliceCred, tailUnknown, failure.System,
			[]string{tinyImage, "apptainer pull failed: FATAL:   While making image from oci registry: something entirely new"}},
		{"no FATAL line at all", tokenCred, tailNoFatal, failure.System, []string{"apptainer pull failed: Killed"}},
		{"empty output", mechtest.Anonymous, "", failure.System, []string{tinyImage, "apptainer pull failed"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := classifyPull(tinyImage, tt.cred(t), tt.tail, storageForTest)
			require.Error(t, err)
			assert.Equal(t, tt.class, failure.ClassOf(err), err.Error())
			for _, s := range tt.want {
				assert.Contains(t, err.Error(), s)
			}
			secrets.AssertAbsent(t, "error message", err.Error())
		})
	}
}

// TestClassifyPullReadsTheFatalLine: classification must follow the line
// that made apptainer fail, not harmless words earlier in its output.
func TestClassifyPullReadsTheFatalLine(t *testing.T) {
	tests := []struct {
		name  string
		tail  string
		class failure.Class
	}{
		{"INFO line before a refused connection", "INFO:    gocryptfs not found, will not be able to use gocryptfs\n" + tailRefused,
			failure.System},
		{"WARNING about a certificate before a missing manifest", "WARNING: certificate of the keyserver expires soon\n" + tailManifest,
			failure.User},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := classifyPull(tinyImage, auth.Credential{}, tt.tail, storageForTest)
			assert.Equal(t, tt.class, failure.ClassOf(err), err.Error())
		})
	}
}

func TestReleaseEndsTheLease(t *testing.T) {
	base := t.TempDir()
	r := runtimeFor(config.Mechanism{ImageStorageDir: base}, nil)
	st, err := r.Store()
	require.NoError(t, err)
	key := sifKey(mechtest.Digest1)
	stored := st.Path(key)
	require.NoError(t, os.WriteFile(stored, sifFile("SIF"), 0o600))
	lease, err := st.Use(key, jobKey)
	require.NoError(t, err)
	other, err := st.Use(key, "j43-other")
	require.NoError(t, err)
	jobDir := filepath.Join(base, "job")
	require.NoError(t, os.Mkdir(jobDir, 0o700))
	// Files in the job dir that an older state file may still list.
	jobFile := filepath.Join(jobDir, jobKey+".sif")
	require.NoError(t, os.WriteFile(jobFile, []byte("SIF"), 0o644))

	img := mechanism.Image{Ref: tinyImage, Handle: stored, Format: FormatSIF, Lease: lease, Private: []string{jobFile, stored}}
	require.NoError(t, r.Release(context.Background(), img, jobDir))
	assert.NoFileExists(t, lease)
	assert.FileExists(t, other, "another job's lease stays")
	assert.FileExists(t, stored, "the stored image stays")
	assert.FileExists(t, jobFile, "Release removes no file")

	// Cleanup may run twice; an image without a lease has nothing to end.
	require.NoError(t, r.Release(context.Background(), img, jobDir))
	require.NoError(t, r.Release(context.Background(), mechanism.Image{Handle: stored}, jobDir))
}

func TestReleaseRefusesOtherLeases(t *testing.T) {
	base := t.TempDir()
	r := runtimeFor(config.Mechanism{ImageStorageDir: base}, nil)
	st, err := r.Store()
	require.NoError(t, err)
	key := sifKey(mechtest.Digest1)
	stored := st.Path(key)
	require.NoError(t, os.WriteFile(stored, sifFile("SIF"), 0o600))
	lease, err := st.Use(key, jobKey)
	require.NoError(t, err)
	jobDir := filepath.Join(base, "job")
	require.NoError(t, os.Mkdir(jobDir, 0o700))
	hostFile := filepath.Join(base, "etc", "passwd") // a stand-in: the tests may run as root
	require.NoError(t, os.MkdirAll(filepath.Dir(hostFile), 0o755))
	require.NoError(t, os.WriteFile(hostFile, []byte("root:x:0:0"), 0o644))
	otherStore := filepath.Join(base, "other.ci-exec", "apptainer", "refs", key, jobKey)
	require.NoError(t, os.MkdirAll(filepath.Dir(otherStore), 0o700))
	require.NoError(t, os.WriteFile(otherStore, nil, 0o600))
	precious := []string{stored, lease, hostFile, otherStore, st.Path(key)}

	tests := []struct{ name, lease string }{
		{"the stored image", stored},
		{"a host file", hostFile},
		{"another store's lease", otherStore},
		{"dot-dot out of the refs", filepath.Join(st.Root, "refs", key, "..", "..", "entries", key)},
		{"the refs dir of the key", filepath.Join(st.Root, "refs", key)},
		{"too deep", filepath.Join(st.Root, "refs", key, jobKey, "x")},
		{"relative", filepath.Join("refs", key, jobKey)},
		{"the job dir", jobDir},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := r.Release(context.Background(), mechanism.Image{Handle: stored, Lease: tt.lease}, jobDir)
			require.Error(t, err)
			assert.Contains(t, err.Error(), "not a lease")
			for _, p := range precious {
				assert.FileExists(t, p)
			}
			assert.DirExists(t, jobDir)
		})
	}
}
