//go:build e2e

package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	snapclient "github.com/kubernetes-csi/external-snapshotter/client/v8/clientset/versioned"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

// The k8s mode against a control plane running cowcsi with deploy/'s
// classes: the e2e harness of test/e2e, or any cluster.
// COWBENCH_E2E_KUBECONFIG names its kubeconfig; COWBENCH_E2E_NODE a node
// running the driver (default node-a, the harness's first node).
//
// test/e2e does not export a way to start its control plane yet; until it
// does, start one and point these variables at it (docs/COWBENCH.md).
func k8sTarget(t *testing.T) (kubeconfig, node string) {
	t.Helper()
	kubeconfig = os.Getenv("COWBENCH_E2E_KUBECONFIG")
	if kubeconfig == "" {
		t.Skip("COWBENCH_E2E_KUBECONFIG is not set: no control plane to run against")
	}
	node = os.Getenv("COWBENCH_E2E_NODE")
	if node == "" {
		node = "node-a"
	}
	return kubeconfig, node
}

// leftovers lists namespaces made by cowbench with prefix, and the PVs and
// VolumeSnapshotContents that referred to them.
func leftovers(t *testing.T, kubeconfig, prefix string) []string {
	t.Helper()
	rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	kube := kubernetes.NewForConfigOrDie(rc)
	snap := snapclient.NewForConfigOrDie(rc)
	ctx := context.Background()
	var left []string
	nss, err := kube.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, ns := range nss.Items {
		if strings.HasPrefix(ns.Name, prefix) {
			left = append(left, "namespace "+ns.Name)
		}
	}
	pvs, err := kube.CoreV1().PersistentVolumes().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, pv := range pvs.Items {
		if pv.Spec.ClaimRef != nil && strings.HasPrefix(pv.Spec.ClaimRef.Namespace, prefix) {
			left = append(left, "PV "+pv.Name)
		}
	}
	vscs, err := snap.SnapshotV1().VolumeSnapshotContents().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range vscs.Items {
		if strings.HasPrefix(c.Spec.VolumeSnapshotRef.Namespace, prefix) {
			left = append(left, "VolumeSnapshotContent "+c.Name)
		}
	}
	return left
}

func TestK8sE2E(t *testing.T) {
	kubeconfig, node := k8sTarget(t)
	prefix := "cowbench-test-"
	t.Cleanup(func() {
		if left := leftovers(t, kubeconfig, prefix); len(left) > 0 {
			t.Errorf("left in the cluster: %v", left)
		}
	})
	out := filepath.Join(t.TempDir(), "r.json")
	code, stdout, _ := cowbench(t, t.Context(), "k8s", "--kubeconfig", kubeconfig, "--storage-class", "cowcsi",
		"--snapshot-class", "cowcsi-snapclass", "--node", node, "--namespace-prefix", prefix,
		"--sizes", "64Mi,256Mi", "--snapshots", "2", "--concurrency", "1,2", "--volumes", "2", "--op-timeout", "2m",
		"--output", "table,json="+out)
	if code != exitOK {
		t.Fatalf("exit %d, want 0", code)
	}
	t.Logf("\n%s", stdout)
	checkRows(t, readResult(t, out), controllerOps, []string{"64Mi", "256Mi"}, []int{1, 2})
}

// TestK8sE2EPreflight: a missing snapshot class or an unset node of a
// WaitForFirstConsumer class stop the run with exit 2 before anything is
// created.
func TestK8sE2EPreflight(t *testing.T) {
	kubeconfig, node := k8sTarget(t)
	prefix := "cowbench-preflight-"
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--snapshot-class", "no-such-class", "--node", node}, `volume snapshot class "no-such-class" not found`},
		{[]string{"--snapshot-class", "cowcsi-snapclass"}, "--node NAME"},
	} {
		args := append([]string{"k8s", "--kubeconfig", kubeconfig, "--storage-class", "cowcsi", "--namespace-prefix", prefix}, tc.args...)
		code, _, stderr := cowbench(t, t.Context(), args...)
		if code != exitSetup || !strings.Contains(stderr, tc.want) {
			t.Errorf("%q: exit %d, stderr %q; want exit %d and %q", tc.args, code, stderr, exitSetup, tc.want)
		}
	}
	if left := leftovers(t, kubeconfig, prefix); len(left) > 0 {
		t.Errorf("created before the checks: %v", left)
	}
}
