package registry

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func selfSigned(t *testing.T, cn string) (*x509.Certificate, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	require.NoError(t, err)
	c, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	return c, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func TestLoadTrustReadsBundleAndDirOnce(t *testing.T) {
	a, pemA := selfSigned(t, "ca-a")
	b, pemB := selfSigned(t, "ca-b")
	c, pemC := selfSigned(t, "ca-c")
	dir := t.TempDir()
	bundle := filepath.Join(dir, "bundle.crt")
	require.NoError(t, os.WriteFile(bundle, append(append([]byte{}, pemA...), pemB...), 0o644))
	certs := filepath.Join(dir, "certs")
	require.NoError(t, os.Mkdir(certs, 0o755))
	// The directory holds the bundle itself, a duplicate and one CA that
	// only it has (not yet in the bundle).
	require.NoError(t, os.WriteFile(filepath.Join(certs, "bundle.crt"), append(append([]byte{}, pemA...), pemB...), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(certs, "a.pem"), pemA, 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(certs, "c.pem"), pemC, 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(certs, "junk.txt"), []byte("not a certificate"), 0o644))
	t.Setenv("SSL_CERT_FILE", bundle)
	t.Setenv("SSL_CERT_DIR", certs)

	pool := loadTrust()
	require.NotNil(t, pool)
	for _, cert := range []*x509.Certificate{a, b, c} {
		_, err := cert.Verify(x509.VerifyOptions{Roots: pool})
		assert.NoError(t, err, cert.Subject.CommonName)
	}
	other, _ := selfSigned(t, "other")
	_, err := other.Verify(x509.VerifyOptions{Roots: pool})
	assert.Error(t, err, "a CA that is in neither place is not trusted")

	t.Setenv("SSL_CERT_FILE", filepath.Join(dir, "missing"))
	t.Setenv("SSL_CERT_DIR", filepath.Join(dir, "missing-dir"))
	assert.Nil(t, loadTrust(), "nothing found: the standard library decides")
}
