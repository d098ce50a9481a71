package e2e

import (
	"context"
	"testing"
	"time"

	storagev1 "k8s.io/api/storage/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestDeploy: every object of deploy/ passed a server-side dry-run apply and
// was applied (in setup, before any node started); here they are read back,
// and what the node plugin publishes by itself is checked: the CSINode
// topology and, from csi-provisioner's capacity tracking with the RBAC of
// deploy/, one CSIStorageCapacity per node owned by the DaemonSet.
func TestDeploy(t *testing.T) {
	c := needCluster(t)
	ctx := t.Context()
	for _, o := range c.manifest {
		gvk := o.GroupVersionKind()
		m, err := c.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.dyn.Resource(m.Resource).Namespace(o.GetNamespace()).Get(ctx, o.GetName(), metav1.GetOptions{}); err != nil {
			t.Errorf("%s %s/%s: %v", gvk.Kind, o.GetNamespace(), o.GetName(), err)
		}
	}
	t.Logf("%d objects of deploy/ passed a server-side dry run and are applied", len(c.manifest))

	for _, n := range c.nodes {
		csiNode, err := c.kube.StorageV1().CSINodes().Get(ctx, n.name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if d := csiNode.Spec.Drivers; len(d) != 1 || d[0].Name != driverName || d[0].NodeID != n.name || len(d[0].TopologyKeys) != 1 || d[0].TopologyKeys[0] != topologyKey {
			t.Errorf("CSINode %s drivers %+v", n.name, d)
		}
	}

	// csi-provisioner polls capacity once a minute at most; it publishes
	// the first objects soon after it starts.
	wctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	var caps []storagev1.CSIStorageCapacity
	err := waitFor(wctx, 250*time.Millisecond, "a CSIStorageCapacity per node", func() (bool, error) {
		list, err := c.kube.StorageV1().CSIStorageCapacities("kube-system").List(wctx, metav1.ListOptions{})
		if err != nil {
			return false, err
		}
		caps = list.Items
		seen := map[string]bool{}
		for _, sc := range caps {
			if sc.StorageClassName == storageClass && sc.NodeTopology != nil && sc.Capacity != nil && sc.Capacity.Value() > 0 {
				seen[sc.NodeTopology.MatchLabels[topologyKey]] = true
			}
		}
		return len(seen) == len(c.nodes), nil
	})
	if err != nil {
		t.Fatalf("%v; have %d objects", err, len(caps))
	}
	for _, sc := range caps {
		if len(sc.OwnerReferences) != 1 || sc.OwnerReferences[0].Kind != "DaemonSet" || sc.OwnerReferences[0].Name != "cowcsi-node" {
			t.Errorf("CSIStorageCapacity %s owned by %+v, want the DaemonSet cowcsi-node", sc.Name, sc.OwnerReferences)
		}
		t.Logf("CSIStorageCapacity %s: %s on %v", sc.Name, sc.Capacity, sc.NodeTopology.MatchLabels)
	}
}
