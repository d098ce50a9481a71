package driver

import (
	"context"
	"sort"
	"sync"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// inFlight is the set of volume and snapshot IDs with a mutating call in
// progress. A second call on a busy ID gets Aborted at once: the CO retries
// with backoff, and the first call's result then answers the retry.
type inFlight struct {
	mu   sync.Mutex
	busy map[string]struct{}
}

func newInFlight() *inFlight { return &inFlight{busy: map[string]struct{}{}} }

// tryLock takes all keys or none. Empty keys are ignored (the wrapped call
// then rejects the missing field itself).
func (f *inFlight) tryLock(keys ...string) (unlock func(), ok bool) {
	var ks []string
	for _, k := range keys {
		if k != "" {
			ks = append(ks, k)
		}
	}
	sort.Strings(ks)
	ks = compactStrings(ks)
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, k := range ks {
		if _, taken := f.busy[k]; taken {
			return nil, false
		}
	}
	for _, k := range ks {
		f.busy[k] = struct{}{}
	}
	return func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		for _, k := range ks {
			delete(f.busy, k)
		}
	}, true
}

func compactStrings(s []string) []string {
	out := s[:0]
	for i, v := range s {
		if i == 0 || v != s[i-1] {
			out = append(out, v)
		}
	}
	return out
}

func withLock[Req, Resp any](f *inFlight, ctx context.Context, req Req, keys []string,
	call func(context.Context, Req) (Resp, error)) (Resp, error) {
	unlock, ok := f.tryLock(keys...)
	if !ok {
		var zero Resp
		return zero, status.Errorf(codes.Aborted, "an operation on %v is already in progress", keys)
	}
	defer unlock()
	return call(ctx, req)
}

// lockedController serialises mutating controller calls per ID. Read-only
// calls (List*, Get*, ValidateVolumeCapabilities, capabilities) pass
// through the embedded server unlocked: they change nothing, the engine
// answers them from a consistent catalog snapshot, and making a CO's
// listing wait behind a long CreateSnapshot freeze would gain nothing.
type lockedController struct {
	csi.ControllerServer
	f *inFlight
}

var _ csi.ControllerServer = (*lockedController)(nil)

func (l *lockedController) CreateVolume(ctx context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	keys := []string{}
	if req.GetName() != "" {
		keys = append(keys, volumeIDFor(req.GetName()))
	}
	// The source too: cloning a mounted volume freezes it, which must not
	// race with its staging or a snapshot of it.
	keys = append(keys, req.GetVolumeContentSource().GetVolume().GetVolumeId())
	return withLock(l.f, ctx, req, keys, l.ControllerServer.CreateVolume)
}

func (l *lockedController) DeleteVolume(ctx context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	return withLock(l.f, ctx, req, []string{req.GetVolumeId()}, l.ControllerServer.DeleteVolume)
}

func (l *lockedController) CreateSnapshot(ctx context.Context, req *csi.CreateSnapshotRequest) (*csi.CreateSnapshotResponse, error) {
	keys := []string{req.GetSourceVolumeId()}
	if req.GetName() != "" {
		keys = append(keys, snapshotIDFor(req.GetName()))
	}
	return withLock(l.f, ctx, req, keys, l.ControllerServer.CreateSnapshot)
}

func (l *lockedController) DeleteSnapshot(ctx context.Context, req *csi.DeleteSnapshotRequest) (*csi.DeleteSnapshotResponse, error) {
	return withLock(l.f, ctx, req, []string{req.GetSnapshotId()}, l.ControllerServer.DeleteSnapshot)
}

// lockedNode serialises node calls that change a volume's state per volume
// ID. NodeGetVolumeStats, NodeGetVolumeHealth, NodeGetInfo and
// NodeGetCapabilities pass through unlocked: they only read, and the kubelet
// polls stats on its own schedule; an Aborted stats call during a long
// stage would only produce noise.
type lockedNode struct {
	csi.NodeServer
	f *inFlight
}

var _ csi.NodeServer = (*lockedNode)(nil)

func (l *lockedNode) NodeStageVolume(ctx context.Context, req *csi.NodeStageVolumeRequest) (*csi.NodeStageVolumeResponse, error) {
	return withLock(l.f, ctx, req, []string{req.GetVolumeId()}, l.NodeServer.NodeStageVolume)
}

func (l *lockedNode) NodeUnstageVolume(ctx context.Context, req *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	return withLock(l.f, ctx, req, []string{req.GetVolumeId()}, l.NodeServer.NodeUnstageVolume)
}

func (l *lockedNode) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	return withLock(l.f, ctx, req, []string{req.GetVolumeId()}, l.NodeServer.NodePublishVolume)
}

func (l *lockedNode) NodeUnpublishVolume(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	return withLock(l.f, ctx, req, []string{req.GetVolumeId()}, l.NodeServer.NodeUnpublishVolume)
}

func (l *lockedNode) NodeExpandVolume(ctx context.Context, req *csi.NodeExpandVolumeRequest) (*csi.NodeExpandVolumeResponse, error) {
	return withLock(l.f, ctx, req, []string{req.GetVolumeId()}, l.NodeServer.NodeExpandVolume)
}
