package e2e

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	snapv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumesnapshot/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// storeContents is what all node stores hold: volume and snapshot IDs.
func storeContents(t *testing.T, c *cluster) []string {
	t.Helper()
	var ids []string
	for _, n := range c.nodes {
		vols, err := n.controller().ListVolumes(t.Context(), &csi.ListVolumesRequest{})
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range vols.GetEntries() {
			ids = append(ids, n.name+"/"+e.GetVolume().GetVolumeId())
		}
		snaps, err := n.controller().ListSnapshots(t.Context(), &csi.ListSnapshotsRequest{})
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range snaps.GetEntries() {
			ids = append(ids, n.name+"/"+e.GetSnapshot().GetSnapshotId())
		}
	}
	slices.Sort(ids)
	return ids
}

// TestWrongRequests: requests that cannot be met say so in the objects'
// status and events, and leave nothing half-made in the stores.
func TestWrongRequests(t *testing.T) {
	c := needCluster(t)
	ns := newNS(t, c)
	_, _ = provision(t, ns, claim{name: "src", size: "2Gi", node: nodeA})
	snapshotReady(t, ns, "snap", "src", snapshotClass)

	t.Run("SnapshotOfMissingPVC", func(t *testing.T) {
		ctx := t.Context()
		before := storeContents(t, c)
		if _, err := ns.createSnapshot(ctx, "of-nothing", "no-such-pvc", snapshotClass); err != nil {
			t.Fatal(err)
		}
		vs := waitSnapshotError(t, ns, "of-nothing", "claim")
		t.Logf("status.error: %s", *vs.Status.Error.Message)
		// snapshot-controller's words; it does not name the claim.
		if !strings.Contains(*vs.Status.Error.Message, "claim") {
			t.Errorf("the error does not say the claim is the problem: %s", *vs.Status.Error.Message)
		}
		if _, err := ns.waitEvent(ctx, "VolumeSnapshot", "of-nothing", "SnapshotContentCreationFailed"); err != nil {
			t.Error(err)
		}
		if vs.Status.BoundVolumeSnapshotContentName != nil {
			t.Errorf("bound to content %s", *vs.Status.BoundVolumeSnapshotContentName)
		}
		t.Logf("events:%s", ns.events(ctx, "VolumeSnapshot", "of-nothing"))
		if after := storeContents(t, c); !slices.Equal(before, after) {
			t.Errorf("stores changed: %v -> %v", before, after)
		}
	})

	t.Run("RestoreIntoSmallerPVC", func(t *testing.T) {
		ctx := t.Context()
		before := storeContents(t, c)
		if _, err := ns.createPVC(ctx, claim{name: "too-small", size: "1Gi", node: nodeA, source: snapshotSource("snap")}); err != nil {
			t.Fatal(err)
		}
		ev, err := ns.waitEvent(ctx, "PersistentVolumeClaim", "too-small", "ProvisioningFailed")
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("event: %s %s: %s", ev.Reason, ev.Source.Component, ev.Message)
		if !strings.Contains(ev.Message, "less than the size") {
			t.Errorf("ProvisioningFailed does not say the size is too small: %s", ev.Message)
		}
		pvc, err := c.kube.CoreV1().PersistentVolumeClaims(ns.name).Get(ctx, "too-small", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if pvc.Status.Phase != corev1.ClaimPending {
			t.Errorf("claim is %s, want Pending", pvc.Status.Phase)
		}
		if after := storeContents(t, c); !slices.Equal(before, after) {
			t.Errorf("stores changed: %v -> %v", before, after)
		}
	})

	// The scheduler knows nothing of where a snapshot lives: a restore can
	// be asked of another node. That node's csi-provisioner takes it, and
	// its driver has no such snapshot.
	t.Run("RestoreOnOtherNode", func(t *testing.T) {
		ctx := t.Context()
		before := storeContents(t, c)
		if _, err := ns.createPVC(ctx, claim{name: "elsewhere", size: "2Gi", node: nodeB, source: snapshotSource("snap")}); err != nil {
			t.Fatal(err)
		}
		ev, err := ns.waitEvent(ctx, "PersistentVolumeClaim", "elsewhere", "ProvisioningFailed")
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("event: %s %s: %s", ev.Reason, ev.Source.Component, ev.Message)
		if !strings.Contains(ev.Message, "NotFound") {
			t.Errorf("ProvisioningFailed does not say the snapshot is not found: %s", ev.Message)
		}
		if after := storeContents(t, c); !slices.Equal(before, after) {
			t.Errorf("stores changed: %v -> %v", before, after)
		}
	})

	t.Run("BadSnapshotClassParameter", func(t *testing.T) {
		ctx := t.Context()
		before := storeContents(t, c)
		bad := &snapv1.VolumeSnapshotClass{
			ObjectMeta:     metav1.ObjectMeta{Name: "cowcsi-bad-" + ns.name},
			Driver:         driverName,
			DeletionPolicy: snapv1.VolumeSnapshotContentDelete,
			Parameters:     map[string]string{"cowcsi.io/freeze": "maybe"},
		}
		if _, err := c.snap.SnapshotV1().VolumeSnapshotClasses().Create(ctx, bad, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			_ = c.snap.SnapshotV1().VolumeSnapshotClasses().Delete(context.Background(), bad.Name, metav1.DeleteOptions{})
		})
		if _, err := ns.createSnapshot(ctx, "bad-param", "src", bad.Name); err != nil {
			t.Fatal(err)
		}
		// A fresh class can be missing from snapshot-controller's cache
		// for a moment ("not found", retried): wait for the driver's word.
		vs := waitSnapshotError(t, ns, "bad-param", "cowcsi.io/freeze")
		t.Logf("status.error: %s", *vs.Status.Error.Message)
		if !strings.Contains(*vs.Status.Error.Message, "cowcsi.io/freeze") {
			t.Errorf("the error does not name the parameter: %s", *vs.Status.Error.Message)
		}
		// csi-snapshotter reports on the content; events about a
		// cluster-scoped object go to the default namespace.
		if vs.Status.BoundVolumeSnapshotContentName == nil {
			t.Fatal("no content named in the snapshot's status")
		}
		content := *vs.Status.BoundVolumeSnapshotContentName
		ev, err := c.waitEvent(ctx, metav1.NamespaceDefault, "VolumeSnapshotContent", content, "SnapshotCreationFailed")
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("event on %s: %s %s: %s", content, ev.Reason, ev.Source.Component, ev.Message)
		if after := storeContents(t, c); !slices.Equal(before, after) {
			t.Errorf("stores changed: %v -> %v", before, after)
		}
	})
}

// waitSnapshotError waits for a VolumeSnapshot's status.error to contain
// want and checks that it is not ready.
func waitSnapshotError(t *testing.T, ns *testNS, name, want string) *snapv1.VolumeSnapshot {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), defaultTimeout)
	defer cancel()
	var last string
	vs, err := until(ctx, ns.snapshotLW(name), &snapv1.VolumeSnapshot{}, func(s *snapv1.VolumeSnapshot) (bool, error) {
		if s.Status != nil && s.Status.Error != nil && s.Status.Error.Message != nil {
			last = *s.Status.Error.Message
			return strings.Contains(last, want), nil
		}
		return false, nil
	})
	if err != nil {
		t.Fatalf("VolumeSnapshot %s status.error with %q: %v (last error: %q); events:%s", name, want, err, last, ns.events(context.Background(), "VolumeSnapshot", name))
	}
	if vs.Status.ReadyToUse != nil && *vs.Status.ReadyToUse {
		t.Errorf("VolumeSnapshot %s is readyToUse despite the error", name)
	}
	return vs
}
