package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	snapv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumesnapshot/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/rand"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"
	watchtools "k8s.io/client-go/tools/watch"
)

const (
	storageClass   = "cowcsi"
	snapshotClass  = "cowcsi-snapclass"
	selectedNode   = "volume.kubernetes.io/selected-node"
	defaultTimeout = 60 * time.Second
)

// testNS is a namespace of one test. Its cleanup deletes the test's
// snapshots and claims and waits until their PVs and VolumeSnapshotContents
// are gone, so that every test leaves the node stores as it found them.
type testNS struct {
	c    *cluster
	name string
}

func newNS(t *testing.T, c *cluster) *testNS {
	t.Helper()
	name := strings.ToLower(strings.ReplaceAll(t.Name(), "/", "-"))
	if len(name) > 40 {
		name = name[:40]
	}
	name = strings.Trim(name, "-") + "-" + rand.String(5)
	ctx := t.Context()
	if _, err := c.kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ns := &testNS{c: c, name: name}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if err := ns.drain(ctx); err != nil {
			t.Errorf("cleaning up namespace %s: %v%s", name, err, c.logHint())
		}
	})
	return ns
}

// drain deletes the namespace's snapshots and claims, waits for what they
// own in the stores to be deleted, then deletes the namespace.
func (ns *testNS) drain(ctx context.Context) error {
	c := ns.c
	vss, err := c.snap.SnapshotV1().VolumeSnapshots(ns.name).List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	for _, vs := range vss.Items {
		if err := c.snap.SnapshotV1().VolumeSnapshots(ns.name).Delete(ctx, vs.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			return err
		}
	}
	if err := c.kube.CoreV1().PersistentVolumeClaims(ns.name).DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{}); err != nil {
		return err
	}
	err = waitFor(ctx, 200*time.Millisecond, "the namespace's PVs and snapshot contents to go", func() (bool, error) {
		pvs, err := c.kube.CoreV1().PersistentVolumes().List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, err
		}
		for _, pv := range pvs.Items {
			if pv.Spec.ClaimRef != nil && pv.Spec.ClaimRef.Namespace == ns.name && pv.Spec.PersistentVolumeReclaimPolicy == corev1.PersistentVolumeReclaimDelete {
				return false, fmt.Errorf("PV %s is still %s", pv.Name, pv.Status.Phase)
			}
		}
		vscs, err := c.snap.SnapshotV1().VolumeSnapshotContents().List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, err
		}
		for _, vsc := range vscs.Items {
			if vsc.Spec.VolumeSnapshotRef.Namespace == ns.name && vsc.Spec.DeletionPolicy == snapv1.VolumeSnapshotContentDelete {
				return false, fmt.Errorf("VolumeSnapshotContent %s is still there", vsc.Name)
			}
		}
		return true, nil
	})
	if err != nil {
		return err
	}
	return c.kube.CoreV1().Namespaces().Delete(ctx, ns.name, metav1.DeleteOptions{})
}

// claim is a PVC to create.
type claim struct {
	name   string
	size   string
	node   string // the scheduler's pick: the selected-node annotation
	source *corev1.TypedLocalObjectReference
	class  string
}

func snapshotSource(name string) *corev1.TypedLocalObjectReference {
	return &corev1.TypedLocalObjectReference{APIGroup: ptr(snapv1.GroupName), Kind: "VolumeSnapshot", Name: name}
}

func pvcSource(name string) *corev1.TypedLocalObjectReference {
	return &corev1.TypedLocalObjectReference{Kind: "PersistentVolumeClaim", Name: name}
}

func (ns *testNS) createPVC(ctx context.Context, cl claim) (*corev1.PersistentVolumeClaim, error) {
	if cl.class == "" {
		cl.class = storageClass
	}
	pvc := &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: cl.name, Namespace: ns.name},
		Spec: corev1.PersistentVolumeClaimSpec{
			AccessModes:      []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			StorageClassName: &cl.class,
			Resources:        corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse(cl.size)}},
			DataSource:       cl.source,
		},
	}
	if cl.node != "" {
		pvc.Annotations = map[string]string{selectedNode: cl.node}
	}
	return ns.c.kube.CoreV1().PersistentVolumeClaims(ns.name).Create(ctx, pvc, metav1.CreateOptions{})
}

func (ns *testNS) createSnapshot(ctx context.Context, name, pvc, class string) (*snapv1.VolumeSnapshot, error) {
	vs := &snapv1.VolumeSnapshot{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns.name},
		Spec: snapv1.VolumeSnapshotSpec{
			VolumeSnapshotClassName: &class,
			Source:                  snapv1.VolumeSnapshotSource{PersistentVolumeClaimName: &pvc},
		},
	}
	return ns.c.snap.SnapshotV1().VolumeSnapshots(ns.name).Create(ctx, vs, metav1.CreateOptions{})
}

// until watches one object until cond holds.
func until[T runtime.Object](ctx context.Context, lw cache.ListerWatcher, obj T, cond func(T) (bool, error)) (T, error) {
	var zero T
	ev, err := watchtools.UntilWithSync(ctx, lw, obj, nil, func(e watch.Event) (bool, error) {
		if e.Type == watch.Deleted {
			return false, fmt.Errorf("deleted while waiting")
		}
		o, ok := e.Object.(T)
		if !ok {
			return false, nil
		}
		return cond(o)
	})
	if err != nil {
		return zero, err
	}
	return ev.Object.(T), nil
}

// listWatch is a ListerWatcher over the objects of one kind that match the
// field selector sel; list and watch are the typed client's List and Watch.
func listWatch[L runtime.Object](sel fields.Selector,
	list func(context.Context, metav1.ListOptions) (L, error),
	watchFn func(context.Context, metav1.ListOptions) (watch.Interface, error),
) cache.ListerWatcher {
	return &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			o.FieldSelector = sel.String()
			return list(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			o.FieldSelector = sel.String()
			return watchFn(ctx, o)
		},
	}
}

// byName selects the object named name.
func byName(name string) fields.Selector { return fields.OneTermEqualSelector("metadata.name", name) }

func (ns *testNS) pvcLW(name string) cache.ListerWatcher {
	api := ns.c.kube.CoreV1().PersistentVolumeClaims(ns.name)
	return listWatch(byName(name), api.List, api.Watch)
}

func (ns *testNS) snapshotLW(name string) cache.ListerWatcher {
	api := ns.c.snap.SnapshotV1().VolumeSnapshots(ns.name)
	return listWatch(byName(name), api.List, api.Watch)
}

// waitBound waits for the claim to be Bound and returns it with its PV.
func (ns *testNS) waitBound(ctx context.Context, name string) (*corev1.PersistentVolumeClaim, *corev1.PersistentVolume, error) {
	ctx, cancel := context.WithTimeout(ctx, defaultTimeout)
	defer cancel()
	pvc, err := until(ctx, ns.pvcLW(name), &corev1.PersistentVolumeClaim{}, func(p *corev1.PersistentVolumeClaim) (bool, error) {
		return p.Status.Phase == corev1.ClaimBound, nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("PVC %s/%s Bound: %w; events: %s", ns.name, name, err, ns.events(context.Background(), "PersistentVolumeClaim", name))
	}
	pv, err := ns.c.kube.CoreV1().PersistentVolumes().Get(ctx, pvc.Spec.VolumeName, metav1.GetOptions{})
	return pvc, pv, err
}

// waitReady waits for readyToUse and returns the snapshot and its content.
func (ns *testNS) waitReady(ctx context.Context, name string) (*snapv1.VolumeSnapshot, *snapv1.VolumeSnapshotContent, error) {
	ctx, cancel := context.WithTimeout(ctx, defaultTimeout)
	defer cancel()
	vs, err := until(ctx, ns.snapshotLW(name), &snapv1.VolumeSnapshot{}, func(s *snapv1.VolumeSnapshot) (bool, error) {
		if s.Status != nil && s.Status.Error != nil && s.Status.Error.Message != nil {
			// Errors can be transient (retried); keep waiting but remember.
			return false, nil
		}
		return s.Status != nil && s.Status.ReadyToUse != nil && *s.Status.ReadyToUse, nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("VolumeSnapshot %s/%s readyToUse: %w; events: %s", ns.name, name, err, ns.events(context.Background(), "VolumeSnapshot", name))
	}
	vsc, err := ns.c.snap.SnapshotV1().VolumeSnapshotContents().Get(ctx, *vs.Status.BoundVolumeSnapshotContentName, metav1.GetOptions{})
	return vs, vsc, err
}

// events returns the events about one object, oldest first, one a line.
func (ns *testNS) events(ctx context.Context, kind, name string) string {
	evs, err := ns.c.kube.CoreV1().Events(ns.name).List(ctx, metav1.ListOptions{
		FieldSelector: fields.Set{"involvedObject.kind": kind, "involvedObject.name": name}.String(),
	})
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	for _, e := range evs.Items {
		fmt.Fprintf(&b, "\n  %s %s %s: %s", e.Type, e.Reason, e.Source.Component, e.Message)
	}
	return b.String()
}

// waitEvent waits for an event about the object whose reason is one of
// reasons, and returns it.
func (ns *testNS) waitEvent(ctx context.Context, kind, name string, reasons ...string) (*corev1.Event, error) {
	return ns.c.waitEvent(ctx, ns.name, kind, name, reasons...)
}

// waitEvent waits for an event in namespace (for cluster-scoped objects:
// "default") about the object, with one of the reasons.
func (c *cluster) waitEvent(ctx context.Context, namespace, kind, name string, reasons ...string) (*corev1.Event, error) {
	ctx, cancel := context.WithTimeout(ctx, defaultTimeout)
	defer cancel()
	api := c.kube.CoreV1().Events(namespace)
	lw := listWatch(fields.Set{"involvedObject.kind": kind, "involvedObject.name": name}.AsSelector(), api.List, api.Watch)
	ev, err := until(ctx, lw, &corev1.Event{}, func(e *corev1.Event) (bool, error) {
		for _, r := range reasons {
			if e.Reason == r {
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		return nil, fmt.Errorf("event %v about %s %s: %w", reasons, kind, name, err)
	}
	return ev, nil
}

// pvNode returns the node a PV's node affinity pins it to.
func pvNode(pv *corev1.PersistentVolume) string {
	if pv.Spec.NodeAffinity == nil || pv.Spec.NodeAffinity.Required == nil {
		return ""
	}
	for _, t := range pv.Spec.NodeAffinity.Required.NodeSelectorTerms {
		for _, e := range t.MatchExpressions {
			if e.Key == topologyKey && len(e.Values) == 1 {
				return e.Values[0]
			}
		}
	}
	return ""
}
