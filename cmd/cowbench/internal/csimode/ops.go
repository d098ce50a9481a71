package csimode

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/moby/sys/mountinfo"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cowcsi/cowcsi/cmd/cowbench/internal/bench"
)

// mayExist says whether a failed create may still have created the object:
// the call timed out, was cancelled, or the driver is still working on the
// name. csi-provisioner treats the same codes as not final.
func mayExist(err error) bool {
	switch status.Code(err) {
	case codes.Canceled, codes.DeadlineExceeded, codes.Unavailable, codes.Aborted, codes.ResourceExhausted:
		return true
	}
	return errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}

func (r *runner) createVolume(ctx context.Context, v *volume) error {
	resp, err := r.d.ctrl.CreateVolume(ctx, r.createVolumeRequest(v))
	if err != nil {
		if mayExist(err) {
			r.track(v) // cleanup asks again by name, and deletes it if it exists
		}
		return err
	}
	v.id, v.context = resp.GetVolume().GetVolumeId(), resp.GetVolume().GetVolumeContext()
	r.track(v)
	return nil
}

func (r *runner) createVolumeRequest(v *volume) *csi.CreateVolumeRequest {
	return &csi.CreateVolumeRequest{
		Name:                      v.name,
		CapacityRange:             &csi.CapacityRange{RequiredBytes: v.size},
		VolumeCapabilities:        []*csi.VolumeCapability{r.cap},
		Parameters:                r.cfg.Parameters,
		VolumeContentSource:       v.source,
		AccessibilityRequirements: r.d.accessibility(),
	}
}

// createSnapshot returns when the snapshot is ready to use. A driver that
// cuts snapshots asynchronously answers ready_to_use=false; csi-snapshotter
// then calls CreateSnapshot again with the same name until it is ready,
// and so does this, with the same backoff.
func (r *runner) createSnapshot(ctx context.Context, s *snapshot) error {
	req := &csi.CreateSnapshotRequest{SourceVolumeId: s.src.id, Name: s.name, Parameters: r.cfg.SnapshotParameters}
	wait := r.cfg.ReadyPoll
	for {
		resp, err := r.d.ctrl.CreateSnapshot(ctx, req)
		if err != nil {
			if mayExist(err) {
				r.trackSnap(s)
			}
			return err
		}
		if s.id == "" {
			s.id, s.size = resp.GetSnapshot().GetSnapshotId(), resp.GetSnapshot().GetSizeBytes()
			r.trackSnap(s)
		}
		if resp.GetSnapshot().GetReadyToUse() {
			return nil
		}
		r.notReady.Add(1)
		select {
		case <-ctx.Done():
			return fmt.Errorf("snapshot %s not ready to use: %w", s.id, ctx.Err())
		case <-time.After(wait):
		}
		wait = min(2*wait, 5*time.Second)
	}
}

func (r *runner) deleteSnapshot(ctx context.Context, s *snapshot) error {
	if _, err := r.d.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: s.id}); err != nil {
		return err
	}
	r.mu.Lock()
	delete(r.snaps, s)
	r.mu.Unlock()
	return nil
}

func (r *runner) deleteVolume(ctx context.Context, v *volume) error {
	if _, err := r.d.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.id}); err != nil {
		return err
	}
	r.mu.Lock()
	delete(r.vols, v)
	r.mu.Unlock()
	return nil
}

func (r *runner) track(v *volume) {
	r.mu.Lock()
	r.vols[v] = true
	r.mu.Unlock()
}

func (r *runner) trackSnap(s *snapshot) {
	r.mu.Lock()
	r.snaps[s] = true
	r.mu.Unlock()
}

// attachAndWrite does what the attach/detach controller and the kubelet do
// before a pod runs, then writes the data; it returns the volumes written.
// Each step marks the volume before its call, so that cleanup undoes a
// step that failed halfway (every undo is idempotent in CSI).
func (r *runner) attachAndWrite(ctx context.Context, phase func(string, int) bench.Phase, n int, vols []*volume) []*volume {
	if r.attach {
		vols = bench.Each(ctx, r.rec, phase(bench.OpCtrlPublish, n), vols, func(ctx context.Context, v *volume) error {
			v.ctrlPublished = true
			resp, err := r.d.ctrl.ControllerPublishVolume(ctx, &csi.ControllerPublishVolumeRequest{
				VolumeId: v.id, NodeId: r.d.nodeInfo.GetNodeId(), VolumeCapability: r.cap, VolumeContext: v.context})
			v.publish = resp.GetPublishContext()
			return err
		})
	}
	if r.d.staged() {
		vols = bench.Each(ctx, r.rec, phase(bench.OpNodeStage, n), vols, func(ctx context.Context, v *volume) error {
			path := r.stagingPath(v)
			if err := os.MkdirAll(path, 0o750); err != nil {
				return err
			}
			v.staging = path
			_, err := r.d.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.id, PublishContext: v.publish,
				StagingTargetPath: path, VolumeCapability: r.cap, VolumeContext: v.context})
			return err
		})
	}
	vols = bench.Each(ctx, r.rec, phase(bench.OpNodePublish, n), vols, func(ctx context.Context, v *volume) error {
		path := r.targetPath(v)
		// The kubelet makes the parent; the driver makes the target.
		if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
			return err
		}
		v.target = path
		_, err := r.d.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: v.id, PublishContext: v.publish,
			StagingTargetPath: v.staging, TargetPath: path, VolumeCapability: r.cap, VolumeContext: v.context})
		return err
	})
	ph := phase(bench.OpWrite, n)
	ph.Bytes = r.cfg.Write
	return bench.Each(ctx, r.rec, ph, vols, func(ctx context.Context, v *volume) error {
		h := fnv.New64a()
		h.Write([]byte(v.name))
		return writeData(ctx, v.target, r.cfg.Write, r.cfg.Access == bench.AccessBlock, h.Sum64())
	})
}

// detach undoes attachAndWrite for every volume marked attached.
func (r *runner) detach(ctx context.Context, phase func(string, int) bench.Phase, n int, vols []*volume) {
	marked := func(f func(*volume) bool) []*volume {
		var out []*volume
		for _, v := range vols {
			if f(v) {
				out = append(out, v)
			}
		}
		return out
	}
	bench.Each(ctx, r.rec, phase(bench.OpNodeUnpublish, n), marked(func(v *volume) bool { return v.target != "" }), r.unpublish)
	if r.d.staged() {
		bench.Each(ctx, r.rec, phase(bench.OpNodeUnstage, n), marked(func(v *volume) bool { return v.staging != "" }), r.unstage)
	}
	if r.attach {
		bench.Each(ctx, r.rec, phase(bench.OpCtrlUnpublish, n), marked(func(v *volume) bool { return v.ctrlPublished }), r.ctrlUnpublish)
	}
}

func (r *runner) unpublish(ctx context.Context, v *volume) error {
	if _, err := r.d.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target}); err != nil {
		return err
	}
	removeEmptyDirs(v.target, r.kubelet)
	v.target = ""
	return nil
}

func (r *runner) unstage(ctx context.Context, v *volume) error {
	if _, err := r.d.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging}); err != nil {
		return err
	}
	removeEmptyDirs(v.staging, r.kubelet)
	v.staging = ""
	return nil
}

func (r *runner) ctrlUnpublish(ctx context.Context, v *volume) error {
	if _, err := r.d.ctrl.ControllerUnpublishVolume(ctx, &csi.ControllerUnpublishVolumeRequest{VolumeId: v.id, NodeId: r.d.nodeInfo.GetNodeId()}); err != nil {
		return err
	}
	v.ctrlPublished = false
	return nil
}

// removeEmptyDirs removes path and its parents up to (not including) root,
// as the kubelet does, stopping at the first that is not an empty
// directory. os.Remove never removes a directory with something in it, nor
// a mount point: nothing a driver left mounted is touched.
func removeEmptyDirs(path, root string) {
	root = filepath.Clean(root)
	for p := filepath.Clean(path); strings.HasPrefix(p, root+string(filepath.Separator)); p = filepath.Dir(p) {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			return
		}
	}
}

// cleanup removes what the run left: volumes still attached (an
// interrupted or failed run), snapshots and volumes not deleted, and
// objects whose create timed out (asked for again by name, as CSI's
// idempotent creates allow, and deleted if they exist).
func (r *runner) cleanup(ctx context.Context) error {
	r.mu.Lock()
	var vols []*volume
	for v := range r.vols {
		vols = append(vols, v)
	}
	var snaps []*snapshot
	for s := range r.snaps {
		snaps = append(snaps, s)
	}
	r.mu.Unlock()
	if len(vols)+len(snaps) == 0 {
		return nil
	}
	slices.SortFunc(vols, func(a, b *volume) int { return strings.Compare(a.name, b.name) })
	slices.SortFunc(snaps, func(a, b *snapshot) int { return strings.Compare(a.name, b.name) })
	r.prog.Printf("cleanup: %d volumes, %d snapshots left", len(vols), len(snaps))

	var mu sync.Mutex
	var errs []error
	fail := func(err error) {
		mu.Lock()
		errs = append(errs, err)
		mu.Unlock()
	}
	parallel(vols, func(v *volume) {
		if v.target != "" {
			if err := r.unpublish(ctx, v); err != nil {
				fail(fmt.Errorf("NodeUnpublishVolume %s at %s: %w", v.id, v.target, err))
				return
			}
		}
		if v.staging != "" {
			if err := r.unstage(ctx, v); err != nil {
				fail(fmt.Errorf("NodeUnstageVolume %s at %s: %w", v.id, v.staging, err))
				return
			}
		}
		if v.ctrlPublished {
			if err := r.ctrlUnpublish(ctx, v); err != nil {
				fail(fmt.Errorf("ControllerUnpublishVolume %s: %w", v.id, err))
			}
		}
	})
	parallel(snaps, func(s *snapshot) {
		if s.id == "" {
			resp, err := r.d.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: s.src.id, Name: s.name, Parameters: r.cfg.SnapshotParameters})
			if err != nil {
				// Most likely it was never made; say so in case it was.
				fail(fmt.Errorf("snapshot %s: its CreateSnapshot timed out and asking again failed (%v): it may exist", s.name, err))
				return
			}
			s.id = resp.GetSnapshot().GetSnapshotId()
		}
		if err := r.deleteSnapshot(ctx, s); err != nil {
			fail(fmt.Errorf("DeleteSnapshot %s (%s): %w", s.id, s.name, err))
		}
	})
	parallel(vols, func(v *volume) {
		if v.target != "" || v.staging != "" || v.ctrlPublished {
			fail(fmt.Errorf("volume %s (%s) is left: still attached", v.id, v.name))
			return
		}
		if v.id == "" {
			resp, err := r.d.ctrl.CreateVolume(ctx, r.createVolumeRequest(v))
			if err != nil {
				fail(fmt.Errorf("volume %s: its CreateVolume timed out and asking again failed (%v): it may exist", v.name, err))
				return
			}
			v.id = resp.GetVolume().GetVolumeId()
		}
		if err := r.deleteVolume(ctx, v); err != nil {
			fail(fmt.Errorf("DeleteVolume %s (%s): %w", v.id, v.name, err))
		}
	})
	return errors.Join(errs...)
}

// parallel calls fn on every item, a few at a time.
func parallel[T any](items []T, fn func(T)) {
	sem := make(chan struct{}, 8)
	var wg sync.WaitGroup
	for _, it := range items {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			fn(it)
		})
	}
	wg.Wait()
}

// removeWorkDir removes cowbench's work directory, unless something is
// still mounted under it (a driver that did not unmount): then it is kept,
// and the error says what is mounted.
func removeWorkDir(dir string) error {
	mounts, err := mountsUnder(dir)
	if err != nil {
		return err
	}
	if len(mounts) > 0 {
		return fmt.Errorf("kept %s: still mounted under it: %s", dir, strings.Join(mounts, ", "))
	}
	return os.RemoveAll(dir)
}

// mountsUnder lists the mount points at or below dir.
func mountsUnder(dir string) ([]string, error) {
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(filepath.Clean(dir)))
	if err != nil {
		return nil, err
	}
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.Mountpoint
	}
	return out, nil
}
