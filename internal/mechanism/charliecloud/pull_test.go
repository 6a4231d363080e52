package charliecloud

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
	"github.com/ci-exec/ci-exec/internal/policy"
)

var tinyRef = policy.Ref{
	Given:    "127.0.0.1:5443/ci/tiny:latest",
	Full:     "127.0.0.1:5443/ci/tiny:latest",
	Familiar: "127.0.0.1:5443/ci/tiny:latest",
	Registry: testRegistry,
}

func TestForPath(t *testing.T) {
	tests := []struct{ ref, want string }{
		{"127.0.0.1:5443/ci/tiny:latest", "127.0.0.1+5443%ci%tiny+latest"},
		{"alpine:3.19", "alpine+3.19"},
		{"ci-exec-job:j42-build", "ci-exec-job+j42-build"},
		{"127.0.0.1:5443/ci/tiny@sha256:abcd", "127.0.0.1+5443%ci%tiny@sha256+abcd"},
		{"registry.example.com/group/sub/img", "registry.example.com%group%sub%img"},
		{"", ""},
	}
	for _, tt := range tests {
		t.Run(tt.ref, func(t *testing.T) {
			assert.Equal(t, tt.want, forPath(tt.ref))
		})
	}
}

func TestPullArgv(t *testing.T) {
	infoSys := mechanism.Info{Programs: map[string]string{"ch-image": "/usr/bin/ch-image"}}
	infoApp := mechanism.Info{Programs: map[string]string{"ch-image": "/opt/charliecloud/bin/ch-image", "ch-run": "/opt/charliecloud/bin/ch-run"}}
	const storage = "/scratch/ciuser.ch"
	digest := "sha256:" + strings.Repeat("d1", 32)
	name := tinyRef.FamiliarAtDigest(digest)
	require.Equal(t, "127.0.0.1:5443/ci/tiny@"+digest, name)
	tests := []struct {
		name     string
		info     mechanism.Info
		cred     auth.Credential
		insecure bool
		want     []string
	}{
		{"anonymous", infoSys, auth.Credential{}, false,
			[]string{"/usr/bin/ch-image", "-s", storage, "pull", name}},
		{"user credential", infoSys, userCredential(t), false,
			[]string{"/usr/bin/ch-image", "--auth", "-s", storage, "pull", name}},
		{"job token", infoSys, jobTokenCredential(t), false,
			[]string{"/usr/bin/ch-image", "--auth", "-s", storage, "pull", name}},
		{"insecure anonymous", infoSys, auth.Credential{}, true,
			[]string{"/usr/bin/ch-image", "--tls-no-verify", "-s", storage, "pull", name}},
		{"insecure with credential, application_path", infoApp, userCredential(t), true,
			[]string{"/opt/charliecloud/bin/ch-image", "--auth", "--tls-no-verify", "-s", storage, "pull", name}},
		{"program unknown", mechanism.Info{}, auth.Credential{}, false,
			[]string{"ch-image", "-s", storage, "pull", name}},
	}
	r := newRuntime(config.Mechanism{ImageStorageDir: "/scratch"}, nil)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			argv := r.pullArgv(tt.info, mechanism.PullRequest{Ref: tinyRef, Credential: tt.cred, Insecure: tt.insecure}, name)
			assert.Equal(t, tt.want, argv)
			for _, a := range argv {
				assert.NotContains(t, a, userPassword)
				assert.NotContains(t, a, jobToken)
			}
		})
	}
}

func TestToolEnv(t *testing.T) {
	hostEnv := map[string]string{
		"SECRET":               "x",
		"CUSTOM_ENV_CI_JOB_ID": "7",
		"CUSTOM_ENV_PASSWORD":  "job-secret",
		"PATH":                 "/home/ciuser/.pyenv/shims:/usr/bin",
		"PYTHONPATH":           "/evil",
		"HOME":                 "/root",
		"https_proxy":          "y",
		"NO_PROXY":             "localhost",
		"REQUESTS_CA_BUNDLE":   "/etc/ca.pem",
		"CURL_CA_BUNDLE":       "/etc/curl-ca.pem",
		"SSL_CERT_FILE":        "/etc/ssl/cert.pem",
	}
	base := []string{
		"PATH=" + toolPath,
		"HOME=/home/ciuser",
		"USER=ciuser",
		"LOGNAME=ciuser",
		"LANG=C.UTF-8",
		"CH_IMAGE_CACHE=disabled",
		"CH_IMAGE_STORAGE=/scratch/ciuser.ch",
	}
	proxies := []string{"https_proxy=y", "NO_PROXY=localhost"}
	cas := []string{"REQUESTS_CA_BUNDLE=/etc/ca.pem", "CURL_CA_BUNDLE=/etc/curl-ca.pem", "SSL_CERT_FILE=/etc/ssl/cert.pem"}
	cat := slices.Concat[[]string]
	tests := []struct {
		name     string
		cfg      config.Mechanism
		hostEnv  map[string]string
		cred     auth.Credential
		insecure bool
		want     []string
	}{
		{"anonymous", config.Mechanism{ImageStorageDir: "/scratch"}, hostEnv, auth.Credential{}, false,
			cat(base, []string{"https_proxy=y", "NO_PROXY=localhost"}, cas)},
		{"user credential", config.Mechanism{ImageStorageDir: "/scratch"}, hostEnv, userCredential(t), false,
			cat(base, []string{"https_proxy=y", "NO_PROXY=localhost"}, cas,
				[]string{"CH_IMAGE_USERNAME=u", "CH_IMAGE_PASSWORD=" + userPassword})},
		{"job token", config.Mechanism{ImageStorageDir: "/scratch"}, hostEnv, jobTokenCredential(t), false,
			cat(base, []string{"https_proxy=y", "NO_PROXY=localhost"}, cas,
				[]string{"CH_IMAGE_USERNAME=gitlab-ci-token", "CH_IMAGE_PASSWORD=" + jobToken})},
		{"insecure drops CA bundles", config.Mechanism{ImageStorageDir: "/scratch"}, hostEnv, auth.Credential{}, true,
			cat(base, proxies, []string{"SSL_CERT_FILE=/etc/ssl/cert.pem"})},
		{"only the proxy of SECRET and https_proxy", config.Mechanism{ImageStorageDir: "/scratch"},
			map[string]string{"SECRET": "x", "https_proxy": "y"}, auth.Credential{}, false,
			cat(base, []string{"https_proxy=y"})},
		{"no host env", config.Mechanism{ImageStorageDir: "/scratch"}, nil, auth.Credential{}, false, base},
		{"application_path first in PATH", config.Mechanism{ImageStorageDir: "/scratch", ApplicationPath: "/opt/ch/bin"}, nil, auth.Credential{}, false,
			append([]string{"PATH=/opt/ch/bin:" + toolPath}, base[1:]...)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newRuntime(tt.cfg, tt.hostEnv)
			got := r.toolEnv(tt.cred, tt.insecure)
			assert.Equal(t, tt.want, got)
			for _, kv := range got {
				assert.False(t, strings.HasPrefix(kv, "CUSTOM_ENV_"), kv)
				assert.False(t, strings.HasPrefix(kv, "SECRET="), kv)
				assert.False(t, strings.HasPrefix(kv, "PYTHONPATH="), kv)
			}
			secrets.AssertCarriedIn(t, got, tt.cred, "CH_IMAGE_PASSWORD")
		})
	}
}

func TestClassifyPull(t *testing.T) {
	user := userCredential(t)
	token := jobTokenCredential(t)
	const ref = "127.0.0.1:5443/ci/tiny:latest"
	// Tails as Charliecloud 0.31 prints them.
	const (
		authGiveUp = "pulling image:    127.0.0.1:5443/ci/tiny:latest\n" +
			"requesting arch:  amd64\n" +
			"error: no further authentication possible, giving up\n"
		notFound = "pulling image:    127.0.0.1:5443/ci/nope:latest\n" +
			"error: unauthorized or not in registry: 127.0.0.1:5443/ci/nope:latest\n" +
			"hint: if your registry needs authentication, use --auth\n"
		tlsFail = "pulling image:    127.0.0.1:5443/ci/tiny:latest\n" +
			"error: HTTPSConnectionPool(host='127.0.0.1', port=5443): Max retries exceeded with url: /v2/ (Caused by SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate (_ssl.c:992)')))\n"
		refused    = "error: HTTPSConnectionPool(host='127.0.0.1', port=5999): Max retries exceeded with url: /v2/ (Caused by NewConnectionError('<urllib3.connection.HTTPSConnection object at 0x7f>: Failed to establish a new connection: [Errno 111] Connection refused'))\n"
		noHost     = "error: HTTPSConnectionPool(host='registry.invalid', port=443): Max retries exceeded with url: /v2/ (Caused by NewConnectionError('<urllib3.connection.HTTPSConnection object at 0x7f>: Failed to establish a new connection: [Errno -2] Name or service not known'))\n"
		badStorage = "error: storage directory seems invalid: /var/tmp/ciuser.ch\n"
		unknown    = "pulling image:    127.0.0.1:5443/ci/tiny:latest\nerror: something new went wrong\n"
	)
	tests := []struct {
		name      string
		cred      auth.Credential
		tail      string
		class     failure.Class
		wantInMsg []string
	}{
		{"refused user credentials", user, authGiveUp, failure.User, []string{ref, "CH_IMAGE_USERNAME", "user u"}},
		{"refused job token", token, authGiveUp, failure.System, []string{ref, "job token", "retry"}},
		{"not found anonymous", auth.Credential{}, notFound, failure.User, []string{ref, "image not found", `tag "latest" of 127.0.0.1:5443/ci/tiny`, "CH_IMAGE_USERNAME and CH_IMAGE_PASSWORD"}},
		{"not found with user credential", user, notFound, failure.User, []string{"image not found"}},
		{"not found with job token", token, notFound, failure.User, []string{"image not found", "job token may read it"}},
		{"untrusted certificate", auth.Credential{}, tlsFail, failure.System, []string{"TLS certificate", "insecure_registries", "CERTIFICATE_VERIFY_FAILED"}},
		{"registry down", auth.Credential{}, refused, failure.System, []string{ref, "connection refused by 127.0.0.1:5999: is the registry up?"}},
		{"unknown host", auth.Credential{}, noHost, failure.System, []string{"unreachable", "Name or service not known"}},
		{"broken storage", auth.Credential{}, badStorage, failure.System, []string{"/scratch/ciuser.ch", "broken"}},
		{"unknown error", user, unknown, failure.System, []string{"error: something new went wrong"}},
		{"no error line", auth.Credential{}, "Killed\n", failure.System, []string{"Killed"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := classifyPull(ref, tt.cred, tt.tail, "/scratch/ciuser.ch")
			require.Error(t, err)
			assert.Equal(t, tt.class, failure.ClassOf(err), err.Error())
			for _, s := range tt.wantInMsg {
				assert.Contains(t, err.Error(), s)
			}
			assert.NotContains(t, err.Error(), userPassword)
			assert.NotContains(t, err.Error(), jobToken)
		})
	}
}

func TestReleaseRemovesPerJobPaths(t *testing.T) {
	base := t.TempDir()
	r := newRuntime(config.Mechanism{ImageStorageDir: base}, nil)
	storage := r.Storage
	copyDir := filepath.Join(storage, "img", "ci-exec-job+j42-build")
	makeTree(t, copyDir, []entry{
		file("bin/sh", "#!", 0o755),
		dirEntry("ro", 0o555),
		file("ch/environment", "PATH=/bin\n", 0o644),
	})
	// A read-only directory with content, as images can have.
	makeTree(t, copyDir, []entry{file("ro2/f", "x", 0o444)})
	require.NoError(t, os.Chmod(filepath.Join(copyDir, "ro2"), 0o555))
	scripts := t.TempDir()
	mnt := filepath.Join(scripts, "j42-build.mnt")
	require.NoError(t, os.Mkdir(mnt, 0o700))
	shared := filepath.Join(storage, "img", "127.0.0.1+5443%ci%tiny@sha256+"+strings.Repeat("1", 64))
	makeTree(t, shared, []entry{file("bin/sh", "#!", 0o755)})

	// A stored SquashFS file with two jobs' leases.
	st, err := r.Store()
	require.NoError(t, err)
	key := squashKey("sha256:"+strings.Repeat("1", 64), []string{"/builds/ci"})
	require.NoError(t, os.WriteFile(st.Path(key), []byte("hsqs"), 0o600))
	lease, err := st.Use(key, "j42-build")
	require.NoError(t, err)
	other, err := st.Use(key, "j43-build")
	require.NoError(t, err)

	img := mechanism.Image{Handle: st.Path(key), Private: []string{copyDir, mnt}, Lease: lease}
	require.NoError(t, r.Release(context.Background(), img, scripts))
	assert.NoDirExists(t, copyDir)
	assert.NoDirExists(t, mnt)
	assert.NoFileExists(t, lease)
	assert.FileExists(t, other, "another job's lease stays")
	assert.FileExists(t, st.Path(key), "the stored file is not removed")
	assert.FileExists(t, filepath.Join(shared, "bin/sh"), "the stored image is not touched")

	// Releasing again (cleanup retried) is not an error.
	assert.NoError(t, r.Release(context.Background(), img, scripts))
	// Neither is an image without anything per-job.
	assert.NoError(t, r.Release(context.Background(), mechanism.Image{Handle: "ci-exec-job:j42-build"}, scripts))
}

func TestReleaseRefusesOtherPaths(t *testing.T) {
	base := t.TempDir()
	r := newRuntime(config.Mechanism{ImageStorageDir: base}, nil)
	storage := r.Storage
	shared := filepath.Join(storage, "img", "127.0.0.1+5443%ci%tiny+latest")
	makeTree(t, shared, []entry{file("bin/sh", "#!", 0o755)})
	jobCopy := filepath.Join(storage, "img", "ci-exec-job+k1")
	makeTree(t, jobCopy, []entry{file("bin/sh", "#!", 0o755), file("etc/passwd", "root:x:0:0", 0o644)})
	other := filepath.Join(base, "precious")
	makeTree(t, other, []entry{file("f", "x", 0o644)})
	// A stand-in for /etc/passwd: a regression must not delete the real one
	// when the tests run as root.
	hostFile := filepath.Join(base, "etc", "passwd")
	makeTree(t, filepath.Dir(hostFile), []entry{file("passwd", "root:x:0:0", 0o644)})
	scripts := t.TempDir()
	st, err := r.Store()
	require.NoError(t, err)
	key := squashKey("sha256:"+strings.Repeat("1", 64), []string{"/builds/ci"})
	storeEntry := st.Path(key)
	makeTree(t, filepath.Dir(storeEntry), []entry{file(key, "hsqs", 0o600)})
	jobSqfs := filepath.Join(scripts, "k1.sqfs")
	require.NoError(t, os.WriteFile(jobSqfs, []byte("hsqs"), 0o644))
	oddMnt := filepath.Join(scripts, "Not A Key.mnt")
	require.NoError(t, os.Mkdir(oddMnt, 0o700))
	precious := []string{filepath.Join(shared, "bin/sh"), filepath.Join(jobCopy, "etc/passwd"), filepath.Join(other, "f"),
		hostFile, storeEntry, jobSqfs}

	tests := []struct {
		name string
		path string
	}{
		{"shared image", shared},
		{"host file", hostFile},
		{"whole storage", storage},
		{"img dir", filepath.Join(storage, "img")},
		{"inside a job copy", filepath.Join(jobCopy, "etc")},
		{"dot-dot out of a job copy", filepath.Join(storage, "img", "ci-exec-job+k1") + "/../127.0.0.1+5443%ci%tiny+latest"},
		{"job prefix in another dir", filepath.Join(base, "ci-exec-job+k1")},
		{"other dir", other},
		{"empty job key", filepath.Join(storage, "img", "ci-exec-job+")},
		{"a store entry", storeEntry},
		{"the store", st.Root},
		{"sqfs in the job dir", jobSqfs},
		{"mnt outside the job dir", filepath.Join(base, "k1.mnt")},
		{"mnt with an odd name", oddMnt},
		{"the job dir itself", scripts},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := r.Release(context.Background(), mechanism.Image{Private: []string{tt.path}}, scripts)
			require.Error(t, err)
			assert.Contains(t, err.Error(), "not a per-job image path")
			for _, p := range precious {
				assert.FileExists(t, p)
			}
			assert.DirExists(t, oddMnt)
		})
	}

	t.Run("mnt with an empty job dir", func(t *testing.T) {
		mnt := filepath.Join(scripts, "k1.mnt")
		require.NoError(t, os.Mkdir(mnt, 0o700))
		err := r.Release(context.Background(), mechanism.Image{Private: []string{mnt}}, "")
		require.Error(t, err)
		assert.DirExists(t, mnt)
		require.NoError(t, os.Remove(mnt))
	})

	leases := []struct {
		name, lease string
	}{
		{"a host file", hostFile},
		{"the store entry", storeEntry},
		{"dot-dot out of the refs", filepath.Join(st.Root, "refs", key, "..", "..", "entries", key)},
		{"a refs dir", filepath.Join(st.Root, "refs", key)},
	}
	for _, tt := range leases {
		t.Run("lease: "+tt.name, func(t *testing.T) {
			err := r.Release(context.Background(), mechanism.Image{Lease: tt.lease}, scripts)
			require.Error(t, err)
			assert.Contains(t, err.Error(), "not a lease")
			for _, p := range precious {
				assert.FileExists(t, p)
			}
		})
	}

	// A refused path does not stop the per-job ones in the same list.
	err = r.Release(context.Background(), mechanism.Image{Private: []string{shared, jobCopy}}, scripts)
	require.Error(t, err)
	assert.NoDirExists(t, jobCopy)
	assert.DirExists(t, shared)
}
