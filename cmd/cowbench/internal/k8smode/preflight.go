package k8smode

import (
	"context"
	"errors"
	"fmt"

	snapv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumesnapshot/v1"
	snapclient "github.com/kubernetes-csi/external-snapshotter/client/v8/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// ErrSetup is returned when the run cannot start: the API server is
// unreachable, or a class, node or API it needs is missing or unfit.
var ErrSetup = errors.New("cannot start")

type setupError struct{ msg string }

func (e *setupError) Error() string { return e.msg }
func (e *setupError) Unwrap() error { return ErrSetup }

func setupErrorf(format string, args ...any) error {
	return &setupError{msg: fmt.Sprintf(format, args...)}
}

// clients are the API clients of a run.
type clients struct {
	config *rest.Config
	kube   kubernetes.Interface
	snap   snapclient.Interface
}

// connect loads the kubeconfig as kubectl does and checks that the API
// server answers.
func connect(ctx context.Context, cfg *Config) (*clients, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = cfg.Kubeconfig
	rc, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules,
		&clientcmd.ConfigOverrides{CurrentContext: cfg.Context}).ClientConfig()
	if err != nil {
		return nil, setupErrorf("kubeconfig: %v", err)
	}
	// client-go's default of 5 requests a second would queue the creates
	// of a concurrent phase on the client and count the wait as latency.
	rc.QPS, rc.Burst = 200, 400
	rc.UserAgent = "cowbench"
	c := &clients{config: rc}
	if c.kube, err = kubernetes.NewForConfig(rc); err != nil {
		return nil, err
	}
	if c.snap, err = snapclient.NewForConfig(rc); err != nil {
		return nil, err
	}
	// /version answers every client; a short timeout of its own makes an
	// unreachable server an error now rather than at the first create.
	probe := rest.CopyConfig(rc)
	probe.Timeout = cfg.ConnectTimeout
	dc, err := discovery.NewDiscoveryClientForConfig(probe)
	if err != nil {
		return nil, err
	}
	if _, err := dc.ServerVersion(); err != nil {
		if apierrors.IsUnauthorized(err) || apierrors.IsForbidden(err) {
			return nil, setupErrorf("the Kubernetes API server at %s refuses the credentials of the kubeconfig: %v", rc.Host, err)
		}
		return nil, setupErrorf("cannot reach the Kubernetes API server at %s: %v", rc.Host, err)
	}
	_ = ctx
	return c, nil
}

// classes are the classes a run uses, checked before anything is created.
type classes struct {
	sc   *storagev1.StorageClass
	vsc  *snapv1.VolumeSnapshotClass
	wffc bool
}

// preflight checks everything the run needs, so that a missing class or API
// is reported before anything is created.
func preflight(ctx context.Context, c *clients, cfg *Config) (*classes, error) {
	host := c.config.Host
	if _, err := c.kube.Discovery().ServerResourcesForGroupVersion(snapv1.SchemeGroupVersion.String()); err != nil {
		if apierrors.IsNotFound(err) {
			return nil, setupErrorf("the cluster at %s serves no %s API: install the external-snapshotter CRDs and snapshot-controller", host, snapv1.SchemeGroupVersion)
		}
		return nil, setupErrorf("discovering %s at %s: %v", snapv1.SchemeGroupVersion, host, err)
	}
	var cl classes
	var err error
	cl.sc, err = c.kube.StorageV1().StorageClasses().Get(ctx, cfg.StorageClass, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return nil, setupErrorf("storage class %q not found (kubectl get storageclass lists them)", cfg.StorageClass)
	case err != nil:
		return nil, setupErrorf("storage class %q: %v", cfg.StorageClass, err)
	}
	cl.vsc, err = c.snap.SnapshotV1().VolumeSnapshotClasses().Get(ctx, cfg.SnapshotClass, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return nil, setupErrorf("volume snapshot class %q not found (kubectl get volumesnapshotclass lists them)", cfg.SnapshotClass)
	case err != nil:
		return nil, setupErrorf("volume snapshot class %q: %v", cfg.SnapshotClass, err)
	}
	if cl.vsc.Driver != cl.sc.Provisioner {
		return nil, setupErrorf("volume snapshot class %q is for driver %q, but storage class %q provisions with %q", cfg.SnapshotClass, cl.vsc.Driver, cfg.StorageClass, cl.sc.Provisioner)
	}
	// cowbench deletes what it creates; with Retain the volumes and
	// snapshots would outlive their claims and VolumeSnapshots.
	if cl.sc.ReclaimPolicy != nil && *cl.sc.ReclaimPolicy != corev1.PersistentVolumeReclaimDelete {
		return nil, setupErrorf("storage class %q has reclaimPolicy %s: the volumes cowbench makes would be left behind; use a class with reclaimPolicy Delete", cfg.StorageClass, *cl.sc.ReclaimPolicy)
	}
	if cl.vsc.DeletionPolicy != snapv1.VolumeSnapshotContentDelete {
		return nil, setupErrorf("volume snapshot class %q has deletionPolicy %s: the snapshots cowbench takes would be left behind; use a class with deletionPolicy Delete", cfg.SnapshotClass, cl.vsc.DeletionPolicy)
	}
	cl.wffc = cl.sc.VolumeBindingMode != nil && *cl.sc.VolumeBindingMode == storagev1.VolumeBindingWaitForFirstConsumer
	if cl.wffc && cfg.Node == "" && !cfg.WriterPod {
		return nil, setupErrorf("storage class %q binds volumes on first consumer (WaitForFirstConsumer): pass --node NAME to pick the node, as the scheduler would, or --writer-pod to have pods consume the claims", cfg.StorageClass)
	}
	if cfg.Node != "" {
		if _, err := c.kube.CoreV1().Nodes().Get(ctx, cfg.Node, metav1.GetOptions{}); apierrors.IsNotFound(err) {
			return nil, setupErrorf("--node %q: no such node (kubectl get nodes lists them)", cfg.Node)
		} else if err != nil {
			return nil, setupErrorf("--node %q: %v", cfg.Node, err)
		}
	}
	return &cl, nil
}
