package e2e

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	snapv1 "github.com/kubernetes-csi/external-snapshotter/client/v8/apis/volumesnapshot/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
)

// tracer records when the harness sees each change of the objects of one
// namespace (VolumeSnapshots, PVCs) and of the cluster-scoped objects they
// lead to (VolumeSnapshotContents, PVs), to show where the time goes
// between creating an object and its being ready.
type tracer struct {
	mu     sync.Mutex
	events []traced
	stop   context.CancelFunc
	wg     sync.WaitGroup
}

type traced struct {
	at  time.Time
	obj any // *snapv1.VolumeSnapshot, *snapv1.VolumeSnapshotContent, *corev1.PersistentVolumeClaim, *corev1.PersistentVolume
}

func startTracer(ctx context.Context, ns *testNS) (*tracer, error) {
	ctx, cancel := context.WithCancel(ctx)
	tr := &tracer{stop: cancel}
	c := ns.c
	opts := metav1.ListOptions{}
	type watcher func(context.Context, metav1.ListOptions) (watch.Interface, error)
	// Watch from the current state: list for the resource version first.
	rv := func(list func() (string, error), w watcher) error {
		v, err := list()
		if err != nil {
			return err
		}
		wi, err := w(ctx, metav1.ListOptions{ResourceVersion: v})
		if err != nil {
			return err
		}
		tr.wg.Add(1)
		go func() {
			defer tr.wg.Done()
			defer wi.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case ev, ok := <-wi.ResultChan():
					if !ok {
						return
					}
					if ev.Type == watch.Added || ev.Type == watch.Modified {
						tr.mu.Lock()
						tr.events = append(tr.events, traced{at: time.Now(), obj: ev.Object})
						tr.mu.Unlock()
					}
				}
			}
		}()
		return nil
	}
	vs := c.snap.SnapshotV1().VolumeSnapshots(ns.name)
	vsc := c.snap.SnapshotV1().VolumeSnapshotContents()
	pvc := c.kube.CoreV1().PersistentVolumeClaims(ns.name)
	pv := c.kube.CoreV1().PersistentVolumes()
	for _, w := range []struct {
		list func() (string, error)
		w    watcher
	}{
		{func() (string, error) { l, err := vs.List(ctx, opts); return rvOf(l, err) }, vs.Watch},
		{func() (string, error) { l, err := vsc.List(ctx, opts); return rvOf(l, err) }, vsc.Watch},
		{func() (string, error) { l, err := pvc.List(ctx, opts); return rvOf(l, err) }, pvc.Watch},
		{func() (string, error) { l, err := pv.List(ctx, opts); return rvOf(l, err) }, pv.Watch},
	} {
		if err := rv(w.list, w.w); err != nil {
			cancel()
			return nil, err
		}
	}
	return tr, nil
}

func rvOf(l interface{ GetResourceVersion() string }, err error) (string, error) {
	if err != nil {
		return "", err
	}
	return l.GetResourceVersion(), nil
}

func (tr *tracer) close() {
	tr.stop()
	tr.wg.Wait()
}

// milestone is a named point in an object's life, as an offset from the
// request that started it.
type milestone struct {
	name string
	at   time.Duration
}

// first returns the time of the first recorded event that matches.
func (tr *tracer) first(match func(any) bool) (time.Time, bool) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	for _, e := range tr.events {
		if match(e.obj) {
			return e.at, true
		}
	}
	return time.Time{}, false
}

// snapshotMilestones: from creating VolumeSnapshot ns/name at t0 to
// readyToUse, with who does each step. driverLog is the log of the cowcsi
// that takes the snapshot; uid the VolumeSnapshot's (csi-snapshotter names
// the CSI snapshot "snapshot-<uid>").
func (tr *tracer) snapshotMilestones(ns, name, uid, driverLog string, t0 time.Time) []milestone {
	content := func(f func(*snapv1.VolumeSnapshotContent) bool) func(any) bool {
		return func(o any) bool {
			c, ok := o.(*snapv1.VolumeSnapshotContent)
			return ok && c.Spec.VolumeSnapshotRef.Namespace == ns && c.Spec.VolumeSnapshotRef.Name == name && f(c)
		}
	}
	snap := func(f func(*snapv1.VolumeSnapshot) bool) func(any) bool {
		return func(o any) bool {
			s, ok := o.(*snapv1.VolumeSnapshot)
			return ok && s.Namespace == ns && s.Name == name && f(s)
		}
	}
	steps := []struct {
		name  string
		match func(any) bool
	}{
		{"snapshot-controller: VolumeSnapshotContent created", content(func(*snapv1.VolumeSnapshotContent) bool { return true })},
		{"snapshot-controller: VolumeSnapshot bound to it", snap(func(s *snapv1.VolumeSnapshot) bool {
			return s.Status != nil && s.Status.BoundVolumeSnapshotContentName != nil
		})},
		{"csi-snapshotter → cowcsi: CreateSnapshot call arrives", nil},
		{"cowcsi: snapshot cut (content's status.creationTime)", nil},
		{"csi-snapshotter: snapshotHandle set, content readyToUse", content(func(c *snapv1.VolumeSnapshotContent) bool {
			return c.Status != nil && c.Status.SnapshotHandle != nil
		})},
		{"snapshot-controller: VolumeSnapshot readyToUse", snap(func(s *snapv1.VolumeSnapshot) bool {
			return s.Status != nil && s.Status.ReadyToUse != nil && *s.Status.ReadyToUse
		})},
	}
	out := tr.milestones(t0, steps)
	if at, ok := driverCall(driverLog, "/csi.v1.Controller/CreateSnapshot", "snapshot-"+uid); ok {
		out[2].at = at.Sub(t0)
	}
	// The driver's own clock: the creation_time of its CreateSnapshot
	// response, taken when the engine switched layers.
	tr.mu.Lock()
	for _, e := range tr.events {
		if c, ok := e.obj.(*snapv1.VolumeSnapshotContent); ok && c.Spec.VolumeSnapshotRef.Namespace == ns &&
			c.Spec.VolumeSnapshotRef.Name == name && c.Status != nil && c.Status.CreationTime != nil {
			out[3].at = time.Unix(0, *c.Status.CreationTime).Sub(t0)
			break
		}
	}
	tr.mu.Unlock()
	return out
}

// restoreMilestones: from creating PVC ns/name at t0 to Bound; uid is the
// claim's (csi-provisioner names the CSI volume "pvc-<uid>").
func (tr *tracer) restoreMilestones(ns, name, uid, driverLog string, t0 time.Time) []milestone {
	claim := func(f func(*corev1.PersistentVolumeClaim) bool) func(any) bool {
		return func(o any) bool {
			p, ok := o.(*corev1.PersistentVolumeClaim)
			return ok && p.Namespace == ns && p.Name == name && f(p)
		}
	}
	vol := func(f func(*corev1.PersistentVolume) bool) func(any) bool {
		return func(o any) bool {
			p, ok := o.(*corev1.PersistentVolume)
			return ok && p.Spec.ClaimRef != nil && p.Spec.ClaimRef.Namespace == ns && p.Spec.ClaimRef.Name == name && f(p)
		}
	}
	steps := []struct {
		name  string
		match func(any) bool
	}{
		{"kube-controller-manager: claim handed to cowcsi.io", claim(func(p *corev1.PersistentVolumeClaim) bool {
			return p.Annotations["volume.kubernetes.io/storage-provisioner"] != ""
		})},
		{"csi-provisioner → cowcsi: CreateVolume call arrives", nil},
		{"csi-provisioner: CreateVolume done, PV created", vol(func(*corev1.PersistentVolume) bool { return true })},
		{"kube-controller-manager: PV Bound", vol(func(p *corev1.PersistentVolume) bool { return p.Status.Phase == corev1.VolumeBound })},
		{"kube-controller-manager: PVC Bound", claim(func(p *corev1.PersistentVolumeClaim) bool { return p.Status.Phase == corev1.ClaimBound })},
	}
	out := tr.milestones(t0, steps)
	if at, ok := driverCall(driverLog, "/csi.v1.Controller/CreateVolume", "pvc-"+uid); ok {
		out[1].at = at.Sub(t0)
	}
	return out
}

func (tr *tracer) milestones(t0 time.Time, steps []struct {
	name  string
	match func(any) bool
}) []milestone {
	var out []milestone
	for _, s := range steps {
		if s.match == nil {
			out = append(out, milestone{name: s.name, at: -1})
			continue
		}
		at, ok := tr.first(s.match)
		if !ok {
			out = append(out, milestone{name: s.name, at: -1})
			continue
		}
		out = append(out, milestone{name: s.name, at: at.Sub(t0)})
	}
	return out
}

// percentile of durations, nearest rank.
func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	rank := int(p/100*float64(len(s))+0.999999) - 1
	if rank < 0 {
		rank = 0
	}
	if rank >= len(s) {
		rank = len(s) - 1
	}
	return s[rank]
}

func ms(d time.Duration) string {
	if d < 0 {
		return "—"
	}
	return fmt.Sprintf("%d ms", d.Round(time.Millisecond).Milliseconds())
}

// stepTable renders, for runs of the same milestones, the median time at
// which each is reached and the median time spent since the previous one.
func stepTable(runs [][]milestone) string {
	if len(runs) == 0 {
		return ""
	}
	var b strings.Builder
	b.WriteString("| step | reached at (p50) | since the previous step reached (p50) |\n|---|---:|---:|\n")
	for i := range runs[0] {
		var at, step []time.Duration
		for _, r := range runs {
			if r[i].at < 0 {
				continue
			}
			at = append(at, r[i].at)
			// Since the latest milestone before it in the list that was
			// reached earlier (some steps overlap).
			prev := time.Duration(0)
			for j := 0; j < i; j++ {
				if r[j].at >= 0 && r[j].at <= r[i].at && r[j].at > prev {
					prev = r[j].at
				}
			}
			step = append(step, r[i].at-prev)
		}
		fmt.Fprintf(&b, "| %s | %s | %s |\n", runs[0][i].name, ms(percentile(at, 50)), ms(percentile(step, 50)))
	}
	return b.String()
}

// driverCall returns when the driver logged the start of a CSI call whose
// request carries the given name ("GRPC call" lines at --v=2; klog's header
// has local time to the microsecond and no year).
func driverCall(logPath, method, name string) (time.Time, bool) {
	data, err := os.ReadFile(logPath)
	if err != nil {
		return time.Time{}, false
	}
	for _, line := range strings.Split(string(data), "\n") {
		if !strings.Contains(line, `"GRPC call"`) || !strings.Contains(line, `method="`+method+`"`) ||
			!strings.Contains(line, `\"name\":\"`+name+`\"`) || len(line) < 21 {
			continue
		}
		ts, err := time.ParseInLocation("0102 15:04:05.000000", line[1:21], time.Local)
		if err != nil {
			return time.Time{}, false
		}
		now := time.Now()
		return ts.AddDate(now.Year(), 0, 0), true
	}
	return time.Time{}, false
}
