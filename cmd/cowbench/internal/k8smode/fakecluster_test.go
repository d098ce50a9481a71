package k8smode

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	snapv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumesnapshot/v1"
	snapfake "github.com/kubernetes-csi/external-snapshotter/client/v8/clientset/versioned/fake"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	fakediscovery "k8s.io/client-go/discovery/fake"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/rest"
	k8stesting "k8s.io/client-go/testing"

	"github.com/cowcsi/cowcsi/cmd/cowbench/internal/bench"
)

// fakeCluster plays the controllers of a cluster on fake clientsets: the
// PV binder and external-provisioner (a PVC gets a PV and is Bound, unless
// its class waits for a consumer and no node is selected), snapshot-
// controller and csi-snapshotter (a VolumeSnapshot gets a content and is
// ready), their deletes, and the namespace controller (a namespace's
// deletion deletes what is in it).
type fakeCluster struct {
	kube *fake.Clientset
	snap *snapfake.Clientset
	n    atomic.Int64
	wg   sync.WaitGroup
}

const (
	fakeDriver = "fake.csi.test"
	fakeNode   = "node-1"
)

func newFakeCluster(t *testing.T, wffc bool) *fakeCluster {
	t.Helper()
	mode := storagev1.VolumeBindingImmediate
	if wffc {
		mode = storagev1.VolumeBindingWaitForFirstConsumer
	}
	del := corev1.PersistentVolumeReclaimDelete
	sc := &storagev1.StorageClass{ObjectMeta: metav1.ObjectMeta{Name: "fast"}, Provisioner: fakeDriver, ReclaimPolicy: &del, VolumeBindingMode: &mode}
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: fakeNode}}
	vsc := &snapv1.VolumeSnapshotClass{ObjectMeta: metav1.ObjectMeta{Name: "snaps"}, Driver: fakeDriver, DeletionPolicy: snapv1.VolumeSnapshotContentDelete}
	//lint:ignore SA1019 the snapshot client generates no NewClientset
	f := &fakeCluster{kube: fake.NewClientset(sc, node), snap: snapfake.NewSimpleClientset(vsc)}
	f.kube.Discovery().(*fakediscovery.FakeDiscovery).Resources = []*metav1.APIResourceList{{GroupVersion: snapv1.SchemeGroupVersion.String()}}
	// The fake tracker does not generate names.
	f.kube.PrependReactor("create", "namespaces", func(a k8stesting.Action) (bool, runtime.Object, error) {
		ns := a.(k8stesting.CreateAction).GetObject().(*corev1.Namespace)
		if ns.Name == "" {
			ns.Name = ns.GenerateName + fmt.Sprint(f.n.Add(1))
		}
		return false, nil, nil
	})
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() {
		cancel()
		f.wg.Wait()
	})
	f.watch(ctx, t, f.kube.CoreV1().PersistentVolumeClaims("").Watch, f.pvc)
	f.watch(ctx, t, f.snap.SnapshotV1().VolumeSnapshots("").Watch, f.vs)
	f.watch(ctx, t, f.kube.CoreV1().Namespaces().Watch, f.namespace)
	return f
}

func (f *fakeCluster) clients() *clients {
	return &clients{config: &rest.Config{Host: "https://fake"}, kube: f.kube, snap: f.snap}
}

func (f *fakeCluster) watch(ctx context.Context, t *testing.T, w func(context.Context, metav1.ListOptions) (watch.Interface, error), fn func(context.Context, watch.Event)) {
	wi, err := w(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	f.wg.Go(func() {
		defer wi.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case e, ok := <-wi.ResultChan():
				if !ok {
					return
				}
				fn(ctx, e)
			}
		}
	})
}

func (f *fakeCluster) pvc(ctx context.Context, e watch.Event) {
	p := e.Object.(*corev1.PersistentVolumeClaim)
	switch e.Type {
	case watch.Added:
		if p.Annotations[selectedNodeAnnotation] == "" {
			sc, _ := f.kube.StorageV1().StorageClasses().Get(ctx, *p.Spec.StorageClassName, metav1.GetOptions{})
			if sc != nil && *sc.VolumeBindingMode == storagev1.VolumeBindingWaitForFirstConsumer {
				return // waits for a consumer
			}
		}
		pv := &corev1.PersistentVolume{ObjectMeta: metav1.ObjectMeta{Name: "pvc-" + p.Namespace + "-" + p.Name},
			Spec: corev1.PersistentVolumeSpec{PersistentVolumeReclaimPolicy: corev1.PersistentVolumeReclaimDelete,
				ClaimRef: &corev1.ObjectReference{Namespace: p.Namespace, Name: p.Name}}}
		if _, err := f.kube.CoreV1().PersistentVolumes().Create(ctx, pv, metav1.CreateOptions{}); err != nil {
			return
		}
		p = p.DeepCopy()
		p.Spec.VolumeName = pv.Name
		p.Status.Phase = corev1.ClaimBound
		_, _ = f.kube.CoreV1().PersistentVolumeClaims(p.Namespace).Update(ctx, p, metav1.UpdateOptions{})
	case watch.Deleted:
		if p.Spec.VolumeName != "" {
			_ = f.kube.CoreV1().PersistentVolumes().Delete(ctx, p.Spec.VolumeName, metav1.DeleteOptions{})
		}
	}
}

func (f *fakeCluster) vs(ctx context.Context, e watch.Event) {
	v := e.Object.(*snapv1.VolumeSnapshot)
	content := "snapcontent-" + v.Namespace + "-" + v.Name
	switch e.Type {
	case watch.Added:
		vsc := &snapv1.VolumeSnapshotContent{ObjectMeta: metav1.ObjectMeta{Name: content},
			Spec: snapv1.VolumeSnapshotContentSpec{DeletionPolicy: snapv1.VolumeSnapshotContentDelete, Driver: fakeDriver,
				VolumeSnapshotRef: corev1.ObjectReference{Namespace: v.Namespace, Name: v.Name}}}
		if _, err := f.snap.SnapshotV1().VolumeSnapshotContents().Create(ctx, vsc, metav1.CreateOptions{}); err != nil {
			return
		}
		v = v.DeepCopy()
		ready, size := true, resource.MustParse("1Gi")
		v.Status = &snapv1.VolumeSnapshotStatus{BoundVolumeSnapshotContentName: &content, ReadyToUse: &ready, RestoreSize: &size}
		_, _ = f.snap.SnapshotV1().VolumeSnapshots(v.Namespace).Update(ctx, v, metav1.UpdateOptions{})
	case watch.Deleted:
		_ = f.snap.SnapshotV1().VolumeSnapshotContents().Delete(ctx, content, metav1.DeleteOptions{})
	}
}

func (f *fakeCluster) namespace(ctx context.Context, e watch.Event) {
	if e.Type != watch.Deleted {
		return
	}
	ns := e.Object.(*corev1.Namespace).Name
	pvcs, _ := f.kube.CoreV1().PersistentVolumeClaims(ns).List(ctx, metav1.ListOptions{})
	for _, p := range pvcs.Items {
		_ = f.kube.CoreV1().PersistentVolumeClaims(ns).Delete(ctx, p.Name, metav1.DeleteOptions{})
	}
	vss, _ := f.snap.SnapshotV1().VolumeSnapshots(ns).List(ctx, metav1.ListOptions{})
	for _, v := range vss.Items {
		_ = f.snap.SnapshotV1().VolumeSnapshots(ns).Delete(ctx, v.Name, metav1.DeleteOptions{})
	}
}

// left returns what is left of cowbench's objects: namespaces, claims,
// PVs, snapshots and contents.
func (f *fakeCluster) left(t *testing.T) []string {
	t.Helper()
	ctx, all := context.Background(), metav1.ListOptions{}
	nss, _ := f.kube.CoreV1().Namespaces().List(ctx, all)
	pvcs, _ := f.kube.CoreV1().PersistentVolumeClaims("").List(ctx, all)
	pvs, _ := f.kube.CoreV1().PersistentVolumes().List(ctx, all)
	vss, _ := f.snap.SnapshotV1().VolumeSnapshots("").List(ctx, all)
	vscs, _ := f.snap.SnapshotV1().VolumeSnapshotContents().List(ctx, all)
	var left []string
	for _, l := range []struct {
		kind string
		list runtime.Object
	}{{"namespace", nss}, {"PVC", pvcs}, {"PV", pvs}, {"VolumeSnapshot", vss}, {"VolumeSnapshotContent", vscs}} {
		items, err := meta.ExtractList(l.list)
		if err != nil {
			t.Fatal(err)
		}
		for _, o := range items {
			left = append(left, l.kind+" "+name(o))
		}
	}
	return left
}

func testConfig() Config {
	return Config{StorageClass: "fast", SnapshotClass: "snaps",
		Plan: bench.Plan{Sizes: []int64{1 << 30, 4 << 30}, Concurrency: []int{1, 3}, Volumes: 3, Snapshots: 2, Access: bench.AccessBlock, Clone: true}, NamespacePrefix: "cowbench-",
		ConnectTimeout: 10 * time.Second, OpTimeout: 10 * time.Second, CleanupTimeout: 10 * time.Second}
}

func TestFakeCluster(t *testing.T) {
	for _, wffc := range []bool{false, true} {
		t.Run(fmt.Sprintf("wffc=%v", wffc), func(t *testing.T) {
			f := newFakeCluster(t, wffc)
			cfg := testConfig()
			if wffc {
				cfg.Node = fakeNode
			}
			var ns string
			res, err := run(t.Context(), cfg, f.clients(), time.Now(), nil, func(n string) { ns = n })
			if err != nil {
				t.Fatal(err)
			}
			if !strings.HasPrefix(ns, "cowbench-") {
				t.Errorf("namespace %q", ns)
			}
			want := map[string]int{"CreateVolume": 3, "CreateSnapshot": 6, "restore": 6, "clone": 3, "DeleteSnapshot": 6, "DeleteVolume": 3 + 6 + 3}
			got := map[string]int{}
			for _, r := range res.Rows {
				if r.Errors != 0 || r.Count != want[r.Op] {
					t.Errorf("%s %s c=%d: count %d errors %d, want count %d", r.Op, r.Size, r.Concurrency, r.Count, r.Errors, want[r.Op])
				}
				got[r.Op]++
			}
			for op := range want {
				if got[op] != 4 {
					t.Errorf("%s: %d rows, want 4 (2 sizes × 2 levels)", op, got[op])
				}
			}
			if left := f.left(t); len(left) > 0 {
				t.Errorf("left after the run: %v", left)
			}
		})
	}
}

// TestFakeClusterPreflight: missing or unfit classes and nodes stop the run
// before anything is created.
func TestFakeClusterPreflight(t *testing.T) {
	for _, tc := range []struct {
		name string
		wffc bool
		edit func(*Config)
		want string
	}{
		{"no storage class", false, func(c *Config) { c.StorageClass = "nope" }, `storage class "nope" not found`},
		{"no snapshot class", false, func(c *Config) { c.SnapshotClass = "nope" }, `volume snapshot class "nope" not found`},
		{"wffc without node", true, func(*Config) {}, "--node NAME"},
		{"no such node", true, func(c *Config) { c.Node = "node-9" }, `--node "node-9": no such node`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeCluster(t, tc.wffc)
			cfg := testConfig()
			tc.edit(&cfg)
			res, err := run(t.Context(), cfg, f.clients(), time.Now(), nil, nil)
			if res != nil || err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, %v; want an error with %q", res, err, tc.want)
			}
			if left := f.left(t); len(left) > 0 {
				t.Errorf("created before the check: %v", left)
			}
		})
	}
	t.Run("no snapshot API", func(t *testing.T) {
		f := newFakeCluster(t, false)
		f.kube.Discovery().(*fakediscovery.FakeDiscovery).Resources = nil
		_, err := run(t.Context(), testConfig(), f.clients(), time.Now(), nil, nil)
		if err == nil || !strings.Contains(err.Error(), "serves no snapshot.storage.k8s.io/v1 API") {
			t.Errorf("err %v", err)
		}
	})
}

// TestFakeClusterInterrupted: a run interrupted in the middle deletes its
// namespace and waits for the PVs and contents to go.
func TestFakeClusterInterrupted(t *testing.T) {
	f := newFakeCluster(t, false)
	ctx, cancel := context.WithCancelCause(t.Context())
	var once sync.Once
	f.snap.PrependReactor("create", "volumesnapshots", func(k8stesting.Action) (bool, runtime.Object, error) {
		once.Do(func() { cancel(fmt.Errorf("interrupted (test)")) })
		return false, nil, nil
	})
	res, err := run(ctx, testConfig(), f.clients(), time.Now(), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.Interrupted != "interrupted (test)" {
		t.Errorf("interrupted %q", res.Interrupted)
	}
	if left := f.left(t); len(left) > 0 {
		t.Errorf("left after an interrupted run: %v", left)
	}
}

// TestMain turns off client-go's streaming lists (WatchListClient): the
// fake clientsets do not send the bookmark that ends the initial list, and
// informers would wait for it forever. Real API servers send it.
func TestMain(m *testing.M) {
	os.Setenv("KUBE_FEATURE_WatchListClient", "false")
	os.Exit(m.Run())
}
