package e2e

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	snapv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumesnapshot/v1"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/uuid"
)

// The article's file and its content.
const (
	importantFile = "important.txt"
	importantData = "data-goc-truoc-snapshot\n"
)

// provision creates a claim on a node and waits for it to be Bound on that
// node, and returns the claim and its PV.
func provision(t *testing.T, ns *testNS, cl claim) (*corev1.PersistentVolumeClaim, *corev1.PersistentVolume) {
	t.Helper()
	ctx := t.Context()
	if _, err := ns.createPVC(ctx, cl); err != nil {
		t.Fatal(err)
	}
	pvc, pv, err := ns.waitBound(ctx, cl.name)
	if err != nil {
		t.Fatal(err)
	}
	if got := pvNode(pv); got != cl.node {
		t.Fatalf("PV %s of %s has node affinity %q, want %q", pv.Name, cl.name, got, cl.node)
	}
	return pvc, pv
}

// publishFor stages and publishes the PV on its node for a new pod, with
// unpublish as a cleanup.
func publishFor(t *testing.T, n *node, pv *corev1.PersistentVolume) *mounted {
	t.Helper()
	m, err := n.publish(t.Context(), pv, string(uuid.NewUUID()))
	if m != nil {
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			if err := m.unpublish(ctx); err != nil {
				t.Errorf("unpublish %s: %v", pv.Name, err)
			}
		})
	}
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func snapshotReady(t *testing.T, ns *testNS, name, pvc, class string) (*snapv1.VolumeSnapshot, *snapv1.VolumeSnapshotContent) {
	t.Helper()
	if _, err := ns.createSnapshot(t.Context(), name, pvc, class); err != nil {
		t.Fatal(err)
	}
	vs, vsc, err := ns.waitReady(t.Context(), name)
	if err != nil {
		t.Fatal(err)
	}
	return vs, vsc
}

// storeHas fails the test unless the snapshot is in exactly the given
// node's store (want) or in none (want == "").
func storeHas(t *testing.T, c *cluster, handle, want string) {
	t.Helper()
	for _, n := range c.nodes {
		has, err := n.hasSnapshot(t.Context(), handle)
		if err != nil {
			t.Fatalf("ListSnapshots on %s: %v", n.name, err)
		}
		if has != (n.name == want) {
			t.Errorf("snapshot %s in the store of %s: %v, want %v", handle, n.name, has, n.name == want)
		}
	}
}

// waitSnapshotGone waits until no store holds the snapshot.
func waitSnapshotGone(t *testing.T, c *cluster, handle string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), defaultTimeout)
	defer cancel()
	err := waitFor(ctx, 100*time.Millisecond, "snapshot "+handle+" to leave the stores", func() (bool, error) {
		for _, n := range c.nodes {
			has, err := n.hasSnapshot(ctx, handle)
			if err != nil || has {
				return false, err
			}
		}
		return true, nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func waitContentGone(t *testing.T, c *cluster, name string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), defaultTimeout)
	defer cancel()
	err := waitFor(ctx, 100*time.Millisecond, "VolumeSnapshotContent "+name+" to go", func() (bool, error) {
		_, err := c.snap.SnapshotV1().VolumeSnapshotContents().Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return true, nil
		}
		return false, err
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestReferenceStory is the article's story with cowcsi in place of EBS:
// a PVC, a file written without sync, a VolumeSnapshot, a restore PVC that
// reads the file back whole (no sync needed: the driver freezes the
// filesystem), and the snapshot's fate with deletionPolicy Delete and Retain.
func TestReferenceStory(t *testing.T) {
	c := needCluster(t)
	ctx := t.Context()
	ns := newNS(t, c)
	a := c.node(t, nodeA)

	// The StorageClass and VolumeSnapshotClass are deploy/'s.
	sc, err := c.kube.StorageV1().StorageClasses().Get(ctx, storageClass, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if sc.Provisioner != driverName || sc.VolumeBindingMode == nil || *sc.VolumeBindingMode != storagev1.VolumeBindingWaitForFirstConsumer ||
		sc.AllowVolumeExpansion == nil || !*sc.AllowVolumeExpansion {
		t.Errorf("StorageClass %s: provisioner %s, binding %v, expansion %v", sc.Name, sc.Provisioner, sc.VolumeBindingMode, sc.AllowVolumeExpansion)
	}
	vclass, err := c.snap.SnapshotV1().VolumeSnapshotClasses().Get(ctx, snapshotClass, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if vclass.Driver != driverName || vclass.DeletionPolicy != snapv1.VolumeSnapshotContentDelete {
		t.Errorf("VolumeSnapshotClass %s: driver %s, deletionPolicy %s", vclass.Name, vclass.Driver, vclass.DeletionPolicy)
	}

	_, srcPV := provision(t, ns, claim{name: "src-pvc", size: "2Gi", node: nodeA})
	if has, err := a.hasVolume(ctx, srcPV.Spec.CSI.VolumeHandle); err != nil || !has {
		t.Fatalf("volume %s in the store of %s: %v, %v", srcPV.Spec.CSI.VolumeHandle, nodeA, has, err)
	}
	src := publishFor(t, a, srcPV)
	// No sync: this is the write the article's first restore lost.
	if err := os.WriteFile(filepath.Join(src.target, importantFile), []byte(importantData), 0o644); err != nil {
		t.Fatal(err)
	}

	vs, vsc := snapshotReady(t, ns, "snap1", "src-pvc", snapshotClass)
	handle := *vsc.Status.SnapshotHandle
	t.Logf("snap1 readyToUse, content %s, snapshotHandle %s, restoreSize %s", vsc.Name, handle, vs.Status.RestoreSize)
	if got := vsc.Labels["snapshot.storage.kubernetes.io/managed-by"]; got != nodeA {
		t.Errorf("content %s managed-by label %q, want %q (distributed snapshotting)", vsc.Name, got, nodeA)
	}
	if vs.Status.RestoreSize == nil || vs.Status.RestoreSize.Cmp(resource.MustParse("2Gi")) != 0 {
		t.Errorf("restoreSize %v, want 2Gi", vs.Status.RestoreSize)
	}
	storeHas(t, c, handle, nodeA)

	_, restPV := provision(t, ns, claim{name: "restore-pvc", size: "2Gi", node: nodeA, source: snapshotSource("snap1")})
	rest := publishFor(t, a, restPV)
	got, err := os.ReadFile(filepath.Join(rest.target, importantFile))
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != importantData {
		t.Fatalf("restored %s = %q, want %q", importantFile, got, importantData)
	}

	// deletionPolicy Delete: deleting the VolumeSnapshot deletes the
	// snapshot in the store. The restored volume does not need it.
	if err := c.snap.SnapshotV1().VolumeSnapshots(ns.name).Delete(ctx, "snap1", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitContentGone(t, c, vsc.Name)
	waitSnapshotGone(t, c, handle)
	if got, err := os.ReadFile(filepath.Join(rest.target, importantFile)); err != nil || string(got) != importantData {
		t.Errorf("after the snapshot's deletion the restored file reads %q, %v", got, err)
	}

	t.Run("Retain", func(t *testing.T) {
		retain := vclass.DeepCopy()
		retain.ObjectMeta = metav1.ObjectMeta{Name: "cowcsi-snapclass-retain-" + ns.name}
		retain.DeletionPolicy = snapv1.VolumeSnapshotContentRetain
		if _, err := c.snap.SnapshotV1().VolumeSnapshotClasses().Create(ctx, retain, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			_ = c.snap.SnapshotV1().VolumeSnapshotClasses().Delete(context.Background(), retain.Name, metav1.DeleteOptions{})
		})
		_, vsc := snapshotReady(t, ns, "snap-retain", "src-pvc", retain.Name)
		handle := *vsc.Status.SnapshotHandle
		if err := c.snap.SnapshotV1().VolumeSnapshots(ns.name).Delete(ctx, "snap-retain", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		wctx, cancel := context.WithTimeout(ctx, defaultTimeout)
		defer cancel()
		err := waitFor(wctx, 100*time.Millisecond, "VolumeSnapshot snap-retain to go", func() (bool, error) {
			_, err := c.snap.SnapshotV1().VolumeSnapshots(ns.name).Get(wctx, "snap-retain", metav1.GetOptions{})
			return apierrors.IsNotFound(err), nil
		})
		if err != nil {
			t.Fatal(err)
		}
		// The content and the snapshot stay.
		if _, err := c.snap.SnapshotV1().VolumeSnapshotContents().Get(ctx, vsc.Name, metav1.GetOptions{}); err != nil {
			t.Fatalf("retained content %s: %v", vsc.Name, err)
		}
		storeHas(t, c, handle, nodeA)
		// An administrator deletes a retained snapshot by switching its
		// content to Delete and deleting the content.
		patch := []byte(`{"spec":{"deletionPolicy":"Delete"}}`)
		if _, err := c.snap.SnapshotV1().VolumeSnapshotContents().Patch(ctx, vsc.Name, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
		if err := c.snap.SnapshotV1().VolumeSnapshotContents().Delete(ctx, vsc.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		waitContentGone(t, c, vsc.Name)
		waitSnapshotGone(t, c, handle)
	})
}
