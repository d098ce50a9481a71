package e2e

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
)

// binaries are the programs the cluster runs.
type binaries struct {
	dir       string // the tools cache: kube-apiserver, csi-provisioner, ...
	cowcsi    string
	etcd      string
	crdDir    string // external-snapshotter client/v8 config/crd
	toolsRoot string // test/e2e/tools
	repoRoot  string
}

func (b *binaries) tool(name string) string { return filepath.Join(b.dir, name) }

// findBinaries builds what is missing: the pinned tools through
// build-tools.sh (cached outside the repository, so only the first run
// builds), and cowcsi from this checkout into workDir, so the test runs the
// code it is testing. COWCSI_E2E_TOOLS=dir and COWCSI_E2E_COWCSI=path
// override either.
func findBinaries(workDir string) (*binaries, error) {
	_, file, _, _ := runtime.Caller(0)
	here := filepath.Dir(file)
	b := &binaries{toolsRoot: filepath.Join(here, "tools"), repoRoot: filepath.Clean(filepath.Join(here, "..", ".."))}

	b.dir = os.Getenv("COWCSI_E2E_TOOLS")
	if b.dir == "" {
		cmd := exec.Command("bash", filepath.Join(here, "build-tools.sh"))
		var out bytes.Buffer
		cmd.Stdout = &out
		cmd.Stderr = os.Stderr // progress while the binaries build
		if err := cmd.Run(); err != nil {
			return nil, fmt.Errorf("build-tools.sh: %w", err)
		}
		lines := strings.Split(strings.TrimSpace(out.String()), "\n")
		b.dir = lines[len(lines)-1]
	}
	for _, name := range []string{"kube-apiserver", "kube-controller-manager", "kubectl", "snapshot-controller", "csi-snapshotter", "csi-provisioner", "csi-resizer"} {
		if _, err := os.Stat(b.tool(name)); err != nil {
			return nil, fmt.Errorf("tools directory %s: %w", b.dir, err)
		}
	}

	b.cowcsi = os.Getenv("COWCSI_E2E_COWCSI")
	if b.cowcsi == "" {
		b.cowcsi = filepath.Join(workDir, "cowcsi")
		cmd := exec.Command("go", "build", "-o", b.cowcsi, "./cmd/cowcsi")
		cmd.Dir = b.repoRoot
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("go build ./cmd/cowcsi: %v\n%s", err, out)
		}
	}

	etcd, err := exec.LookPath("etcd")
	if err != nil {
		return nil, fmt.Errorf("etcd not found (Debian package etcd-server; make deps installs it): %w", err)
	}
	b.etcd = etcd

	cmd := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/kubernetes-csi/external-snapshotter/client/v8")
	cmd.Dir = b.toolsRoot
	out, err := cmd.Output()
	if err != nil || strings.TrimSpace(string(out)) == "" {
		return nil, fmt.Errorf("locating the snapshot CRDs (go list -m in %s): %v", b.toolsRoot, err)
	}
	b.crdDir = filepath.Join(strings.TrimSpace(string(out)), "config", "crd")
	if _, err := os.Stat(b.crdDir); err != nil {
		return nil, err
	}
	return b, nil
}
