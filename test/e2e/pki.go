package e2e

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"k8s.io/client-go/util/cert"
	"k8s.io/client-go/util/keyutil"
)

// pki is what the apiserver needs to serve TLS on 127.0.0.1, to sign and
// verify service account tokens, and to know its admin. Clients
// authenticate with bearer tokens, so there are no client certificates.
type pki struct {
	CAFile     string // CA that signed the serving certificate
	CertFile   string // serving certificate (then the CA) for 127.0.0.1 and localhost
	KeyFile    string
	SAKeyFile  string // service account signing key (private)
	SAPubFile  string // and its public half, for verification
	TokenFile  string // static token file with the admin token
	AdminToken string
	caPEM      []byte
}

// The names a client may dial the apiserver by: loopback, and the
// kubernetes Service (first address of --service-cluster-ip-range).
var (
	servingHost = "127.0.0.1"
	servingIPs  = []net.IP{net.ParseIP("10.0.0.1")}
	servingDNS  = []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"}
)

func newPKI(dir string) (*pki, error) {
	p := &pki{
		CAFile:    filepath.Join(dir, "ca.crt"),
		CertFile:  filepath.Join(dir, "apiserver.crt"),
		KeyFile:   filepath.Join(dir, "apiserver.key"),
		SAKeyFile: filepath.Join(dir, "sa.key"),
		SAPubFile: filepath.Join(dir, "sa.pub"),
		TokenFile: filepath.Join(dir, "tokens.csv"),
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	// A fresh CA and a serving certificate it signed; the chain comes
	// back as the serving certificate followed by the CA.
	chainPEM, keyPEM, err := cert.GenerateSelfSignedCertKeyWithOptions(cert.SelfSignedCertKeyOptions{
		Host:         servingHost,
		AlternateIPs: servingIPs,
		AlternateDNS: servingDNS,
		MaxAge:       24 * time.Hour,
	})
	if err != nil {
		return nil, err
	}
	chain, err := cert.ParseCertsPEM(chainPEM)
	if err != nil {
		return nil, err
	}
	if len(chain) != 2 || !chain[1].IsCA {
		return nil, fmt.Errorf("serving certificate: want the certificate and its CA, got %d certificates", len(chain))
	}
	if p.caPEM, err = cert.EncodeCertificates(chain[1]); err != nil {
		return nil, err
	}
	saKeyPEM, saPubPEM, err := newSAKey()
	if err != nil {
		return nil, err
	}
	tok := make([]byte, 24)
	if _, err := rand.Read(tok); err != nil {
		return nil, err
	}
	p.AdminToken = hex.EncodeToString(tok)
	files := []struct {
		path string
		data []byte
	}{
		{p.CAFile, p.caPEM},
		{p.CertFile, chainPEM},
		{p.KeyFile, keyPEM},
		{p.SAKeyFile, saKeyPEM},
		{p.SAPubFile, saPubPEM},
		// token,user,uid,"group1,group2"
		{p.TokenFile, fmt.Appendf(nil, "%s,cowcsi-e2e-admin,cowcsi-e2e-admin,\"system:masters\"\n", p.AdminToken)},
	}
	for _, f := range files {
		if err := os.WriteFile(f.path, f.data, 0o600); err != nil {
			return nil, err
		}
	}
	return p, nil
}

// newSAKey makes the service account token key pair: RSA, as kubeadm
// makes it, PEM-encoded.
func newSAKey() (keyPEM, pubPEM []byte, err error) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, nil, err
	}
	if keyPEM, err = keyutil.MarshalPrivateKeyToPEM(key); err != nil {
		return nil, nil, err
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return nil, nil, err
	}
	return keyPEM, pem.EncodeToMemory(&pem.Block{Type: keyutil.PublicKeyBlockType, Bytes: pub}), nil
}
