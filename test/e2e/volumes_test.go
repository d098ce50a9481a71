package e2e

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// TestClone: a PVC whose dataSource is another PVC gets that PVC's content,
// on the same node, and the two are independent afterwards.
func TestClone(t *testing.T) {
	c := needCluster(t)
	ns := newNS(t, c)
	a := c.node(t, nodeA)

	_, srcPV := provision(t, ns, claim{name: "src", size: "1Gi", node: nodeA})
	src := publishFor(t, a, srcPV)
	if err := os.WriteFile(filepath.Join(src.target, importantFile), []byte(importantData), 0o644); err != nil {
		t.Fatal(err)
	}

	_, clonePV := provision(t, ns, claim{name: "clone", size: "1Gi", node: nodeA, source: pvcSource("src")})
	if clonePV.Spec.CSI.VolumeHandle == srcPV.Spec.CSI.VolumeHandle {
		t.Fatalf("clone has the source's volume handle %s", clonePV.Spec.CSI.VolumeHandle)
	}
	clone := publishFor(t, a, clonePV)
	got, err := os.ReadFile(filepath.Join(clone.target, importantFile))
	if err != nil || string(got) != importantData {
		t.Fatalf("clone's %s = %q, %v; want %q", importantFile, got, err, importantData)
	}

	// Independent: a write to the clone does not show in the source.
	if err := os.WriteFile(filepath.Join(clone.target, importantFile), []byte("changed in the clone\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(filepath.Join(src.target, importantFile)); string(got) != importantData {
		t.Errorf("source's %s = %q after writing the clone", importantFile, got)
	}
}

// TestExpansion: raising a PVC's request. The driver offers only node
// expansion, so csi-resizer takes its trivial resizer (it marks the PV
// resized and asks for a filesystem resize on the node); NodeExpandVolume on
// the volume's own node grows the volume and the mounted filesystem.
func TestExpansion(t *testing.T) {
	c := needCluster(t)
	ctx := t.Context()
	ns := newNS(t, c)
	a := c.node(t, nodeA)

	// deploy/'s class formats ext4; growing a mounted ext4 takes
	// CAP_SYS_RESOURCE (EXT4_IOC_RESIZE_FS), which a privileged pod has but
	// some test machines (this one among them) withhold even from root. Then
	// the same class with xfs, which the driver grows with xfs_growfs.
	class := storageClass
	if !hasCapSysResource(t) {
		sc, err := c.kube.StorageV1().StorageClasses().Get(ctx, storageClass, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		sc = sc.DeepCopy()
		sc.ObjectMeta = metav1.ObjectMeta{Name: "cowcsi-xfs-" + ns.name}
		sc.Parameters["csi.storage.k8s.io/fstype"] = "xfs"
		if _, err := c.kube.StorageV1().StorageClasses().Create(ctx, sc, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			_ = c.kube.StorageV1().StorageClasses().Delete(context.Background(), sc.Name, metav1.DeleteOptions{})
		})
		class = sc.Name
		t.Logf("no CAP_SYS_RESOURCE here: growing xfs (StorageClass %s) instead of ext4", class)
	}
	_, pv := provision(t, ns, claim{name: "grow", size: "1Gi", node: nodeA, class: class})
	m := publishFor(t, a, pv)
	before := fsSize(t, m.target)
	if err := os.WriteFile(filepath.Join(m.target, importantFile), []byte(importantData), 0o644); err != nil {
		t.Fatal(err)
	}

	patch := []byte(`{"spec":{"resources":{"requests":{"storage":"3Gi"}}}}`)
	if _, err := c.kube.CoreV1().PersistentVolumeClaims(ns.name).Patch(ctx, "grow", types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	// csi-resizer: the PV's capacity is raised with no controller call, and
	// the claim waits for the node.
	if _, err := ns.waitEvent(ctx, "PersistentVolumeClaim", "grow", "FileSystemResizeRequired"); err != nil {
		t.Fatal(err)
	}
	pvc, err := until(ctx, ns.pvcLW("grow"), &corev1.PersistentVolumeClaim{}, func(p *corev1.PersistentVolumeClaim) (bool, error) {
		for _, cd := range p.Status.Conditions {
			if cd.Type == corev1.PersistentVolumeClaimFileSystemResizePending && cd.Status == corev1.ConditionTrue {
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatalf("PVC condition FileSystemResizePending: %v", err)
	}
	// Every resizer looked at the driver's capabilities when it started;
	// one of them leads (its pod's name holds the lease) and did the above.
	for _, n := range c.nodes {
		if !strings.Contains(n.log("csi-resizer"), "using trivial resizer") {
			t.Errorf("csi-resizer on %s did not choose its trivial resizer; log:\n%s", n.name, n.log("csi-resizer"))
		}
	}
	lease, err := c.kube.CoordinationV1().Leases("kube-system").Get(ctx, "external-resizer-cowcsi-io", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	holder := ""
	if lease.Spec.HolderIdentity != nil {
		holder = *lease.Spec.HolderIdentity
	}
	leaders := 0
	for _, n := range c.nodes {
		if holder == n.pod.Name {
			t.Logf("csi-resizer of %s (pod %s) leads", n.name, n.pod.Name)
		}
		if strings.Contains(n.log("csi-resizer"), "became leader") {
			leaders++
		}
	}
	if leaders != 1 {
		t.Errorf("%d csi-resizers say they lead (lease holder %q), want 1", leaders, holder)
	}
	pv, err = c.kube.CoreV1().PersistentVolumes().Get(ctx, pv.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	want := resource.MustParse("3Gi")
	if got := pv.Spec.Capacity[corev1.ResourceStorage]; got.Cmp(want) != 0 {
		t.Fatalf("PV capacity %s after the resizer, want %s", got.String(), want.String())
	}

	// The kubelet's part: NodeExpandVolume on the node, then the claim's
	// status.
	resp, err := m.expand(ctx, want.Value())
	if err != nil {
		t.Fatalf("NodeExpandVolume: %v", err)
	}
	after := fsSize(t, m.target)
	t.Logf("filesystem %d -> %d bytes (NodeExpandVolume reports %d)", before, after, resp.GetCapacityBytes())
	if after <= before || after < want.Value()*9/10 {
		t.Errorf("filesystem size %d after expanding to %d (was %d)", after, want.Value(), before)
	}
	if got, err := os.ReadFile(filepath.Join(m.target, importantFile)); err != nil || string(got) != importantData {
		t.Errorf("after expansion %s = %q, %v", importantFile, got, err)
	}
	pvc.Status.Capacity = corev1.ResourceList{corev1.ResourceStorage: want}
	pvc.Status.Conditions = nil
	pvc.Status.AllocatedResourceStatuses = nil
	if _, err := c.kube.CoreV1().PersistentVolumeClaims(ns.name).UpdateStatus(ctx, pvc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// hasCapSysResource says whether this process may grow a mounted ext4.
func hasCapSysResource(t *testing.T) bool {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			caps, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			return err == nil && caps&(1<<unix.CAP_SYS_RESOURCE) != 0
		}
	}
	return false
}

// fsSize is the size of the filesystem mounted at dir.
func fsSize(t *testing.T, dir string) int64 {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Blocks) * int64(st.Bsize)
}

// TestTwoNodes: each node's volumes and snapshots are made, and handled,
// only by that node's driver and sidecars.
func TestTwoNodes(t *testing.T) {
	c := needCluster(t)
	ctx := t.Context()
	ns := newNS(t, c)

	type side struct {
		n      *node
		pv     *corev1.PersistentVolume
		handle string
		data   []byte
	}
	var sides []*side
	for _, name := range []string{nodeA, nodeB} {
		s := &side{n: c.node(t, name), data: []byte("written on " + name + "\n")}
		_, s.pv = provision(t, ns, claim{name: "vol-" + name, size: "1Gi", node: name})
		m := publishFor(t, s.n, s.pv)
		if err := os.WriteFile(filepath.Join(m.target, importantFile), s.data, 0o644); err != nil {
			t.Fatal(err)
		}
		sides = append(sides, s)
	}
	for _, s := range sides {
		for _, n := range c.nodes {
			has, err := n.hasVolume(ctx, s.pv.Spec.CSI.VolumeHandle)
			if err != nil {
				t.Fatal(err)
			}
			if has != (n == s.n) {
				t.Errorf("volume of %s in the store of %s: %v", s.n.name, n.name, has)
			}
		}
	}
	for _, s := range sides {
		_, vsc := snapshotReady(t, ns, "snap-"+s.n.name, "vol-"+s.n.name, snapshotClass)
		s.handle = *vsc.Status.SnapshotHandle
		if got := vsc.Labels["snapshot.storage.kubernetes.io/managed-by"]; got != s.n.name {
			t.Errorf("content %s managed-by %q, want %q", vsc.Name, got, s.n.name)
		}
		storeHas(t, c, s.handle, s.n.name)
		// Only that node's csi-snapshotter touched the content.
		for _, n := range c.nodes {
			if mentions := strings.Contains(n.log("csi-snapshotter"), vsc.Name); mentions != (n == s.n) {
				t.Errorf("csi-snapshotter of %s mentions content %s: %v", n.name, vsc.Name, mentions)
			}
		}
	}
	for _, s := range sides {
		name := "restore-" + s.n.name
		_, pv := provision(t, ns, claim{name: name, size: "1Gi", node: s.n.name, source: snapshotSource("snap-" + s.n.name)})
		m := publishFor(t, s.n, pv)
		if got, err := os.ReadFile(filepath.Join(m.target, importantFile)); err != nil || !bytes.Equal(got, s.data) {
			t.Errorf("restore on %s reads %q, %v; want %q", s.n.name, got, err, s.data)
		}
		// The provisioner that made it names itself in its event:
		// cowcsi.io_<hostname, which is the pod's name>_<uuid>.
		ev, err := ns.waitEvent(ctx, "PersistentVolumeClaim", name, "ProvisioningSucceeded")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(ev.Source.Component, driverName+"_"+s.n.pod.Name+"_") {
			t.Errorf("restore on %s provisioned by %s, not by the csi-provisioner of pod %s", s.n.name, ev.Source.Component, s.n.pod.Name)
		}
	}
}
