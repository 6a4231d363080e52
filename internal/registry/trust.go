package registry

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"sync"
)

// The system's trusted CAs, as the standard library finds them on Linux
// (SSL_CERT_FILE or the first bundle that exists, then SSL_CERT_DIR or the
// certificate directories), but each certificate parsed once: Debian's
// /etc/ssl/certs holds the bundle itself and a link to every certificate
// in it, so the standard loader parses each CA three times, which is most
// of a warm prepare. The trust set is the same.
var (
	bundleFiles = []string{
		"/etc/ssl/certs/ca-certificates.crt",
		"/etc/pki/tls/certs/ca-bundle.crt",
		"/etc/ssl/ca-bundle.pem",
		"/etc/pki/tls/cacert.pem",
		"/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
		"/etc/ssl/cert.pem",
	}
	certDirs = []string{"/etc/ssl/certs", "/etc/pki/tls/certs"}

	trustOnce sync.Once
	trust     *x509.CertPool
)

// systemTrust returns the system's CAs (nil: let the standard library
// decide, e.g. when nothing could be read).
func systemTrust() *x509.CertPool {
	trustOnce.Do(func() { trust = loadTrust() })
	return trust
}

func loadTrust() *x509.CertPool {
	pool := x509.NewCertPool()
	seen := map[[32]byte]bool{}
	n := 0
	add := func(data []byte) {
		for {
			var b *pem.Block
			b, data = pem.Decode(data)
			if b == nil {
				return
			}
			if b.Type != "CERTIFICATE" || len(b.Headers) != 0 {
				continue
			}
			sum := sha256.Sum256(b.Bytes)
			if seen[sum] {
				continue
			}
			seen[sum] = true
			if c, err := x509.ParseCertificate(b.Bytes); err == nil {
				pool.AddCert(c)
				n++
			}
		}
	}
	files := bundleFiles
	if f := os.Getenv("SSL_CERT_FILE"); f != "" {
		files = []string{f}
	}
	for _, f := range files {
		if data, err := os.ReadFile(f); err == nil {
			add(data)
			break
		}
	}
	dirs := certDirs
	if d := os.Getenv("SSL_CERT_DIR"); d != "" {
		dirs = strings.Split(d, ":")
	}
	for _, d := range dirs {
		ents, err := os.ReadDir(d)
		if err != nil {
			continue
		}
		for _, e := range ents {
			if data, err := os.ReadFile(filepath.Join(d, e.Name())); err == nil {
				add(data)
			}
		}
	}
	if n == 0 {
		return nil
	}
	return pool
}
