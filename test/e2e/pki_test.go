package e2e

import (
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"os"
	"strings"
	"testing"

	"k8s.io/client-go/util/cert"
	"k8s.io/client-go/util/keyutil"
)

// TestPKI checks newPKI's files without a cluster (run it with -short, or
// TestMain starts the control plane first): the serving certificate
// verifies against the CA for every name a client dials, the keys match
// their certificates, and the token file names the admin.
func TestPKI(t *testing.T) {
	p, err := newPKI(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	roots, err := cert.NewPool(p.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	pair, err := tls.LoadX509KeyPair(p.CertFile, p.KeyFile)
	if err != nil {
		t.Fatalf("serving certificate and key: %v", err)
	}
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	if leaf.IsCA {
		t.Error("serving certificate is a CA")
	}
	// Loopback, where the harness dials, and the kubernetes Service's
	// address and names, which pods use.
	for _, name := range []string{"127.0.0.1", "localhost", "10.0.0.1", "kubernetes", "kubernetes.default", "kubernetes.default.svc"} {
		_, err := leaf.Verify(x509.VerifyOptions{
			DNSName:   name,
			Roots:     roots,
			KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		})
		if err != nil {
			t.Errorf("serving certificate for %s: %v", name, err)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{DNSName: "example.com", Roots: roots}); err == nil {
		t.Error("serving certificate verifies for example.com")
	}
	if _, err := leaf.Verify(x509.VerifyOptions{DNSName: servingHost, Roots: x509.NewCertPool()}); err == nil {
		t.Error("serving certificate verifies without the CA")
	}
	caPEM, err := os.ReadFile(p.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	if string(caPEM) != string(p.caPEM) {
		t.Error("caPEM differs from the CA file")
	}

	priv, err := keyutil.PrivateKeyFromFile(p.SAKeyFile)
	if err != nil {
		t.Fatalf("service account key: %v", err)
	}
	pubs, err := keyutil.PublicKeysFromFile(p.SAPubFile)
	if err != nil {
		t.Fatalf("service account public key: %v", err)
	}
	signer, ok := priv.(crypto.Signer)
	if !ok || len(pubs) != 1 {
		t.Fatalf("service account keys: private %T, %d public", priv, len(pubs))
	}
	if pub, ok := pubs[0].(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(signer.Public()) {
		t.Error("service account public key is not the signing key's")
	}

	tokens, err := os.ReadFile(p.TokenFile)
	if err != nil {
		t.Fatal(err)
	}
	if len(p.AdminToken) < 32 || !strings.HasPrefix(string(tokens), p.AdminToken+",cowcsi-e2e-admin,") || !strings.Contains(string(tokens), `"system:masters"`) {
		t.Errorf("token file %q for admin token %q", tokens, p.AdminToken)
	}
}
