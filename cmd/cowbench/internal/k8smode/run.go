package k8smode

import (
	"context"
	"fmt"
	"os"
	"regexp"
	"strings"
	"time"

	snapv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumesnapshot/v1"
	snapinformers "github.com/kubernetes-csi/external-snapshotter/client/v8/informers/externalversions"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"

	"github.com/cowcsi/cowcsi/cmd/cowbench/internal/bench"
)

const (
	selectedNodeAnnotation = "volume.kubernetes.io/selected-node"
	createdByLabel         = "app.kubernetes.io/created-by"
	createdBy              = "cowbench"
)

// claim is a PVC cowbench created.
type claim struct {
	name   string
	size   int64
	source *corev1.TypedLocalObjectReference
	node   string // the selected-node annotation: --node, or the scheduler's pick
	pv     string // the bound PV, once Bound
	pod    bool   // a writer pod was created for it
}

// vsnap is a VolumeSnapshot cowbench created.
type vsnap struct {
	name        string
	src         *claim
	restoreSize int64
}

type runner struct {
	cfg  Config
	c    *clients
	cl   *classes
	ns   string
	rec  *bench.Recorder
	prog *bench.Progress
	t    *tracker

	pvcs, vss, pvs, vscs, pods cache.SharedIndexInformer
}

// Run benchmarks the cluster and returns the result. onNamespace is called
// with the namespace's name once it exists, so that the caller can name it
// if the user abandons the cleanup. Everything created is deleted before
// Run returns (the namespace, and the PVs and VolumeSnapshotContents of its
// objects), also when ctx ends; what is left is in the returned error.
// Errors that stop the run before anything is created wrap ErrSetup.
func Run(ctx context.Context, cfg Config, prog *bench.Progress, onNamespace func(string)) (res *bench.Result, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, &setupError{msg: err.Error()}
	}
	started := time.Now()
	c, err := connect(ctx, &cfg)
	if err != nil {
		return nil, err
	}
	return run(ctx, cfg, c, started, prog, onNamespace)
}

// run is Run with the clients made.
func run(ctx context.Context, cfg Config, c *clients, started time.Time, prog *bench.Progress, onNamespace func(string)) (res *bench.Result, err error) {
	cl, err := preflight(ctx, c, &cfg)
	if err != nil {
		return nil, err
	}
	version := "Kubernetes"
	if v, err := c.kube.Discovery().ServerVersion(); err == nil {
		version += " " + v.GitVersion
	}

	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: cfg.NamespacePrefix,
		Labels: map[string]string{createdByLabel: createdBy}}}
	if cfg.WriterPod {
		// The writer runs as the image's user (root in busybox), which the
		// restricted Pod Security level forbids.
		ns.Labels["pod-security.kubernetes.io/enforce"] = "baseline"
	}
	ns, err = c.kube.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{})
	if err != nil {
		return nil, setupErrorf("creating a namespace: %v", err)
	}
	if onNamespace != nil {
		onNamespace(ns.Name)
	}
	r := &runner{cfg: cfg, c: c, cl: cl, ns: ns.Name, prog: prog, rec: bench.NewRecorder(cfg.OpTimeout, prog), t: newTracker()}
	stop := make(chan struct{})
	defer close(stop) // after the cleanup, which waits on the informers
	defer bench.CleanUp(&err, cfg.CleanupTimeout, r.cleanup)
	if err := r.startInformers(ctx, stop); err != nil {
		return nil, err
	}
	prog.AddTotal(cfg.Total(r.cellOps))
	prog.Printf("namespace %s", r.ns)
	cfg.Measure(ctx, prog, r.cell)

	res = &bench.Result{Mode: "k8s", Command: os.Args, Started: started, Rows: r.rec.Rows(), Errors: r.rec.Failures(),
		Target:   fmt.Sprintf("%s at %s, storage class %s (%s), snapshot class %s", version, c.config.Host, cl.sc.Name, cl.sc.Provisioner, cl.vsc.Name),
		Settings: r.settings()}
	if cfg.Clone {
		res.Notes = append(res.Notes, "clone: whether the driver can clone is not visible through Kubernetes; a driver that cannot leaves clones Pending until --op-timeout")
	}
	res.End(ctx)
	return res, nil
}

// startInformers starts one watch per kind: claims, snapshots (and writer
// pods) in the namespace; PVs and snapshot contents cluster-wide, to see
// them deleted.
func (r *runner) startInformers(ctx context.Context, stop chan struct{}) error {
	kns := informers.NewSharedInformerFactoryWithOptions(r.c.kube, 0, informers.WithNamespace(r.ns))
	kall := informers.NewSharedInformerFactory(r.c.kube, 0)
	sns := snapinformers.NewSharedInformerFactoryWithOptions(r.c.snap, 0, snapinformers.WithNamespace(r.ns))
	sall := snapinformers.NewSharedInformerFactory(r.c.snap, 0)
	r.pvcs = kns.Core().V1().PersistentVolumeClaims().Informer()
	r.pvs = kall.Core().V1().PersistentVolumes().Informer()
	r.vss = sns.Snapshot().V1().VolumeSnapshots().Informer()
	r.vscs = sall.Snapshot().V1().VolumeSnapshotContents().Informer()
	all := []cache.SharedIndexInformer{r.pvcs, r.pvs, r.vss, r.vscs}
	kinds := []string{"PersistentVolumeClaim", "PersistentVolume", "VolumeSnapshot", "VolumeSnapshotContent"}
	if r.cfg.WriterPod {
		r.pods = kns.Core().V1().Pods().Informer()
		all, kinds = append(all, r.pods), append(kinds, "Pod")
	}
	for i, inf := range all {
		if _, err := inf.AddEventHandler(r.t.handler(kinds[i])); err != nil {
			return err
		}
	}
	kns.Start(stop)
	kall.Start(stop)
	sns.Start(stop)
	sall.Start(stop)
	sctx, cancel := context.WithTimeout(ctx, r.cfg.ConnectTimeout)
	defer cancel()
	for i, inf := range all {
		if !cache.WaitForCacheSync(sctx.Done(), inf.HasSynced) {
			return fmt.Errorf("listing and watching %ss did not complete within %v", kinds[i], r.cfg.ConnectTimeout)
		}
	}
	return nil
}

func (r *runner) settings() []bench.Setting {
	mode := "Block"
	if r.cfg.Access == bench.AccessMount {
		mode = "Filesystem"
	}
	s := []bench.Setting{{Name: "namespace", Value: r.ns + " (deleted at the end)"}}
	s = append(s, r.cfg.Settings()...)
	s = append(s, bench.Setting{Name: "volumeMode", Value: mode})
	switch {
	case r.cfg.Node != "":
		s = append(s, bench.Setting{Name: "node", Value: r.cfg.Node + " (selected-node annotation on every claim)"})
	case r.cl.wffc:
		s = append(s, bench.Setting{Name: "node", Value: "picked by the scheduler for the writer pods"})
	}
	if r.cfg.WriterPod {
		s = append(s, bench.Setting{Name: "written", Value: fmt.Sprintf("%s of random data per source volume by a pod (%s), synced", bench.SizeLabel(r.cfg.Write), r.cfg.WriterImage)})
	} else {
		s = append(s, bench.Setting{Name: "written", Value: "nothing (no pod; --writer-pod --write SIZE to write data)"})
	}
	return s
}

// cellOps counts the operations of one cell at concurrency level conc.
func (r *runner) cellOps(conc int) int {
	n, s := r.cfg.VolumesFor(conc), r.cfg.Snapshots
	ops := n + 3*n*s + n + n*s // create, snapshot+restore+delete snapshot, delete volumes
	if r.cfg.Clone {
		ops += 2 * n
	}
	if r.cfg.WriterPod {
		ops += n
	}
	return ops
}

var nonName = regexp.MustCompile(`[^a-z0-9]+`)

// cell measures one volume size at one concurrency level.
func (r *runner) cell(ctx context.Context, size int64, conc int) {
	n, nsnap := r.cfg.VolumesFor(conc), r.cfg.Snapshots
	phase := func(op string, planned int) bench.Phase {
		return bench.Phase{Key: bench.Key{Op: op, Size: size, Concurrency: conc}, Planned: planned}
	}
	tag := fmt.Sprintf("%s-c%d", strings.Trim(nonName.ReplaceAllString(strings.ToLower(bench.SizeLabel(size)), "-"), "-"), conc)

	sources := make([]*claim, n)
	for i := range sources {
		sources[i] = &claim{name: fmt.Sprintf("src-%s-v%d", tag, i), size: size, node: r.cfg.Node}
	}
	sources = bench.Each(ctx, r.rec, phase(bench.OpCreateVolume, n), sources, r.createClaim)
	var bound []*claim
	bound = append(bound, sources...)

	if r.cfg.WriterPod {
		sources = bench.Each(ctx, r.rec, phase(bench.OpWrite, n), sources, r.write)
	}

	snaps := bench.Rounds(ctx, r.rec, phase(bench.OpCreateSnapshot, n), nsnap, sources, func(cl *claim, k int) *vsnap {
		return &vsnap{name: fmt.Sprintf("%s-s%d", cl.name, k), src: cl}
	}, r.createSnapshot)
	if r.cfg.WriterPod {
		// The writers kept the volumes in use while they were
		// snapshotted, as an application would.
		r.deletePods(ctx, bound)
	}

	restores := make([]*claim, len(snaps))
	for i, s := range snaps {
		restores[i] = &claim{name: s.name + "-restore", size: max(size, s.restoreSize), node: s.src.node,
			source: &corev1.TypedLocalObjectReference{APIGroup: ptr(snapv1.GroupName), Kind: "VolumeSnapshot", Name: s.name}}
	}
	bound = append(bound, bench.Each(ctx, r.rec, phase(bench.OpRestore, n*nsnap), restores, r.createClaim)...)

	if r.cfg.Clone {
		clones := make([]*claim, len(sources))
		for i, cl := range sources {
			clones[i] = &claim{name: cl.name + "-clone", size: size, node: cl.node,
				source: &corev1.TypedLocalObjectReference{Kind: "PersistentVolumeClaim", Name: cl.name}}
		}
		bound = append(bound, bench.Each(ctx, r.rec, phase(bench.OpClone, n), clones, r.createClaim)...)
	}

	bench.Each(ctx, r.rec, phase(bench.OpDeleteSnapshot, n*nsnap), snaps, r.deleteSnapshot)
	planned := n + n*nsnap
	if r.cfg.Clone {
		planned += n
	}
	// Claims that never bound are left to the namespace's deletion.
	bench.Each(ctx, r.rec, phase(bench.OpDeleteVolume, planned), bound, r.deleteClaim)
}

func ptr[T any](v T) *T { return &v }

// createClaim creates a PVC and returns when it is Bound.
func (r *runner) createClaim(ctx context.Context, cl *claim) error {
	mode := corev1.PersistentVolumeBlock
	if r.cfg.Access == bench.AccessMount {
		mode = corev1.PersistentVolumeFilesystem
	}
	pvc := &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: cl.name, Namespace: r.ns, Labels: map[string]string{createdByLabel: createdBy}},
		Spec: corev1.PersistentVolumeClaimSpec{
			AccessModes:      []corev1.PersistentVolumeAccessMode{corev1.ReadWriteOnce},
			StorageClassName: &r.cl.sc.Name,
			VolumeMode:       &mode,
			Resources: corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{
				corev1.ResourceStorage: *resource.NewQuantity(cl.size, resource.BinarySI)}},
			DataSource: cl.source,
		},
	}
	if cl.node != "" && r.cl.wffc {
		// What the scheduler writes when it picks a node for the first
		// pod of a WaitForFirstConsumer claim.
		pvc.Annotations = map[string]string{selectedNodeAnnotation: cl.node}
	}
	if _, err := r.c.kube.CoreV1().PersistentVolumeClaims(r.ns).Create(ctx, pvc, metav1.CreateOptions{}); err != nil {
		return err
	}
	if r.cfg.WriterPod && cl.source == nil && r.cl.wffc && cl.node == "" {
		// No node given: the claim binds when the scheduler places its
		// first pod, so the pod comes now.
		if err := r.createWriter(ctx, cl); err != nil {
			return err
		}
	}
	o, err := r.t.wait(ctx, "PersistentVolumeClaim", r.ns+"/"+cl.name, r.pvcs.GetStore(), func(o any) (bool, error) {
		p, ok := o.(*corev1.PersistentVolumeClaim)
		return ok && p.Status.Phase == corev1.ClaimBound, nil
	}, r.describeClaim)
	if err != nil {
		return err
	}
	p := o.(*corev1.PersistentVolumeClaim)
	cl.pv = p.Spec.VolumeName
	if cl.node == "" {
		cl.node = p.Annotations[selectedNodeAnnotation]
	}
	return nil
}

func (r *runner) describeClaim(o any) string {
	p, ok := o.(*corev1.PersistentVolumeClaim)
	if !ok {
		return "?"
	}
	s := "phase " + string(p.Status.Phase)
	if ev := r.lastWarning("PersistentVolumeClaim", p.Name); ev != "" {
		s += "; last warning: " + ev
	}
	return s
}

// lastWarning returns the newest Warning event about an object.
func (r *runner) lastWarning(kind, name string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	evs, err := r.c.kube.CoreV1().Events(r.ns).List(ctx, metav1.ListOptions{
		FieldSelector: "involvedObject.kind=" + kind + ",involvedObject.name=" + name + ",type=Warning"})
	if err != nil || len(evs.Items) == 0 {
		return ""
	}
	last := evs.Items[0]
	for _, e := range evs.Items {
		if e.LastTimestamp.After(last.LastTimestamp.Time) || e.EventTime.After(last.EventTime.Time) {
			last = e
		}
	}
	return last.Reason + ": " + last.Message
}

// createSnapshot creates a VolumeSnapshot and returns when it is ready to
// use.
func (r *runner) createSnapshot(ctx context.Context, s *vsnap) error {
	vs := &snapv1.VolumeSnapshot{
		ObjectMeta: metav1.ObjectMeta{Name: s.name, Namespace: r.ns, Labels: map[string]string{createdByLabel: createdBy}},
		Spec: snapv1.VolumeSnapshotSpec{VolumeSnapshotClassName: &r.cl.vsc.Name,
			Source: snapv1.VolumeSnapshotSource{PersistentVolumeClaimName: &s.src.name}},
	}
	if _, err := r.c.snap.SnapshotV1().VolumeSnapshots(r.ns).Create(ctx, vs, metav1.CreateOptions{}); err != nil {
		return err
	}
	o, err := r.t.wait(ctx, "VolumeSnapshot", r.ns+"/"+s.name, r.vss.GetStore(), func(o any) (bool, error) {
		// status.error can be transient: snapshot-controller retries, so
		// only readyToUse ends the wait.
		v, ok := o.(*snapv1.VolumeSnapshot)
		return ok && v.Status != nil && v.Status.ReadyToUse != nil && *v.Status.ReadyToUse, nil
	}, describeSnapshot)
	if err != nil {
		return err
	}
	if rs := o.(*snapv1.VolumeSnapshot).Status.RestoreSize; rs != nil {
		s.restoreSize = rs.Value()
	}
	return nil
}

func describeSnapshot(o any) string {
	v, ok := o.(*snapv1.VolumeSnapshot)
	switch {
	case !ok:
		return "?"
	case v.Status == nil:
		return "no status: is snapshot-controller running?"
	case v.Status.Error != nil && v.Status.Error.Message != nil:
		return "status.error: " + *v.Status.Error.Message
	case v.Status.BoundVolumeSnapshotContentName == nil:
		return "no VolumeSnapshotContent bound yet"
	}
	return "not ready to use; content " + *v.Status.BoundVolumeSnapshotContentName + " (is the driver's csi-snapshotter running?)"
}

func gone(o any) (bool, error) { return o == nil, nil }

func describeAny(o any) string { return name(o) + " still exists" }

// deleteSnapshot deletes a VolumeSnapshot and returns when it is gone.
func (r *runner) deleteSnapshot(ctx context.Context, s *vsnap) error {
	if err := r.c.snap.SnapshotV1().VolumeSnapshots(r.ns).Delete(ctx, s.name, metav1.DeleteOptions{}); err != nil {
		return err
	}
	_, err := r.t.wait(ctx, "VolumeSnapshot", r.ns+"/"+s.name, r.vss.GetStore(), gone, describeAny)
	return err
}

// deleteClaim deletes a PVC and returns when its PV is gone: when the
// driver's DeleteVolume is done.
func (r *runner) deleteClaim(ctx context.Context, cl *claim) error {
	if err := r.c.kube.CoreV1().PersistentVolumeClaims(r.ns).Delete(ctx, cl.name, metav1.DeleteOptions{}); err != nil {
		return err
	}
	var err error
	if cl.pv == "" {
		_, err = r.t.wait(ctx, "PersistentVolumeClaim", r.ns+"/"+cl.name, r.pvcs.GetStore(), gone, describeAny)
	} else {
		_, err = r.t.wait(ctx, "PersistentVolume", cl.pv, r.pvs.GetStore(), gone, func(o any) string {
			if pv, ok := o.(*corev1.PersistentVolume); ok {
				return "PV phase " + string(pv.Status.Phase)
			}
			return "?"
		})
	}
	return err
}
