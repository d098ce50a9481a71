package k8smode

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	snapv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumesnapshot/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"
	watchtools "k8s.io/client-go/tools/watch"
)

// cleanup deletes the namespace, waits until it is gone, then until the PVs
// and VolumeSnapshotContents of its claims and snapshots are gone too: the
// volumes and snapshots in the storage are deleted only then.
func (r *runner) cleanup(ctx context.Context) (err error) {
	start := time.Now()
	r.prog.Printf("cleanup: deleting namespace %s and everything in it", r.ns)
	defer func() {
		if err == nil {
			r.prog.Printf("cleanup: namespace %s, its volumes and snapshots deleted in %v", r.ns, time.Since(start).Round(time.Millisecond))
		}
	}()
	if r.cfg.WriterPod {
		// Writers are killed at once; their data is written.
		err := r.c.kube.CoreV1().Pods(r.ns).DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: ptr(int64(0))}, metav1.ListOptions{})
		if err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("deleting the writer pods of namespace %s: %w", r.ns, err)
		}
	}
	err = r.c.kube.CoreV1().Namespaces().Delete(ctx, r.ns, metav1.DeleteOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("deleting namespace %s: %w (kubectl delete namespace %s)", r.ns, err, r.ns)
	}
	if err := r.waitNamespaceGone(ctx); err != nil {
		return fmt.Errorf("namespace %s is not gone: %w; left in it: %s (kubectl get pvc,volumesnapshot,pod -n %s)",
			r.ns, err, r.leftInNamespace(), r.ns)
	}
	for {
		left := r.leftOutside()
		if len(left) == 0 {
			return nil
		}
		ch := r.t.changed()
		// Look again after subscribing: a delete between the two looks
		// would otherwise be missed.
		if left = r.leftOutside(); len(left) == 0 {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("the volumes and snapshots of namespace %s are not all deleted: %s are left", r.ns, strings.Join(left, ", "))
		}
	}
}

func (r *runner) waitNamespaceGone(ctx context.Context) error {
	api := r.c.kube.CoreV1().Namespaces()
	sel := fields.OneTermEqualSelector("metadata.name", r.ns).String()
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			o.FieldSelector = sel
			return api.List(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			o.FieldSelector = sel
			return api.Watch(ctx, o)
		},
	}
	_, err := watchtools.UntilWithSync(ctx, lw, &corev1.Namespace{}, func(store cache.Store) (bool, error) {
		_, exists, err := store.GetByKey(r.ns)
		return !exists, err
	}, func(e watch.Event) (bool, error) {
		return e.Type == watch.Deleted && name(e.Object) == r.ns, nil
	})
	return err
}

// leftInNamespace names the claims and snapshots still in the namespace.
func (r *runner) leftInNamespace() string {
	var left []string
	for _, o := range r.pvcs.GetStore().List() {
		left = append(left, "PVC "+name(o))
	}
	for _, o := range r.vss.GetStore().List() {
		left = append(left, "VolumeSnapshot "+name(o))
	}
	if r.pods != nil {
		for _, o := range r.pods.GetStore().List() {
			left = append(left, "Pod "+name(o))
		}
	}
	if len(left) == 0 {
		return "nothing cowbench made"
	}
	slices.Sort(left)
	return strings.Join(left, ", ")
}

// leftOutside lists the PVs and VolumeSnapshotContents that belonged to the
// namespace and are set to be deleted with it.
func (r *runner) leftOutside() []string {
	var left []string
	for _, o := range r.pvs.GetStore().List() {
		pv, ok := o.(*corev1.PersistentVolume)
		if ok && pv.Spec.ClaimRef != nil && pv.Spec.ClaimRef.Namespace == r.ns && pv.Spec.PersistentVolumeReclaimPolicy == corev1.PersistentVolumeReclaimDelete {
			left = append(left, "PV "+pv.Name)
		}
	}
	for _, o := range r.vscs.GetStore().List() {
		c, ok := o.(*snapv1.VolumeSnapshotContent)
		if ok && c.Spec.VolumeSnapshotRef.Namespace == r.ns && c.Spec.DeletionPolicy == snapv1.VolumeSnapshotContentDelete {
			left = append(left, "VolumeSnapshotContent "+c.Name)
		}
	}
	slices.Sort(left)
	return left
}
