package driver

import (
	"context"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cowcsi/cowcsi/test/testutil"
)

// TestCreateVolumeRetryAfterSourceDeleted retries CreateVolume for a
// restore and a clone after their sources were deleted: the volume exists
// with the same name and source, so the retry is OK and echoes the source
// (CSI: CreateVolume is idempotent). A retry naming another source is
// AlreadyExists.
func TestCreateVolumeRetryAfterSourceDeleted(t *testing.T) {
	testutil.RequireRoot(t, nodeNeeds...)
	env := newTestEnv(t)
	td := startDriver(t, env)
	ctx := context.Background()

	src := createVolume(t, td, &csi.CreateVolumeRequest{Name: "retry-src"})
	other := createVolume(t, td, &csi.CreateVolumeRequest{Name: "retry-other"})
	snap := snapshot(t, td, "retry-snap", src.GetVolumeId(), nil)
	fromSnap := &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
		Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap.GetSnapshotId()}}}
	fromVol := &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
		Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: src.GetVolumeId()}}}
	fromOther := &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
		Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: other.GetVolumeId()}}}

	restoreReq := func(s *csi.VolumeContentSource) *csi.CreateVolumeRequest {
		return &csi.CreateVolumeRequest{Name: "retry-restore", VolumeContentSource: s,
			VolumeCapabilities: []*csi.VolumeCapability{mountCap(rwo, "ext4")}, CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20}}
	}
	cloneReq := func(s *csi.VolumeContentSource) *csi.CreateVolumeRequest {
		r := restoreReq(s)
		r.Name = "retry-clone"
		return r
	}
	restored := createVolume(t, td, restoreReq(fromSnap))
	cloned := createVolume(t, td, cloneReq(fromVol))

	if _, err := td.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snap.GetSnapshotId()}); err != nil {
		t.Fatalf("DeleteSnapshot: %v", err)
	}
	if _, err := td.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: src.GetVolumeId()}); err != nil {
		t.Fatalf("DeleteVolume of the clone's source: %v", err)
	}

	for _, c := range []struct {
		req  *csi.CreateVolumeRequest
		want *csi.Volume
	}{{restoreReq(fromSnap), restored}, {cloneReq(fromVol), cloned}} {
		resp, err := td.ctrl.CreateVolume(ctx, c.req)
		if err != nil {
			t.Errorf("CreateVolume %s retried after its source was deleted: %v, want OK", c.req.Name, err)
			continue
		}
		got := resp.GetVolume()
		if got.GetVolumeId() != c.want.GetVolumeId() || got.GetCapacityBytes() != c.want.GetCapacityBytes() {
			t.Errorf("CreateVolume %s retried: volume %s (%d bytes), want %s (%d bytes)", c.req.Name,
				got.GetVolumeId(), got.GetCapacityBytes(), c.want.GetVolumeId(), c.want.GetCapacityBytes())
		}
		if s := got.GetContentSource().String(); s != c.req.GetVolumeContentSource().String() {
			t.Errorf("CreateVolume %s retried: content source %s, want %s", c.req.Name, s, c.req.GetVolumeContentSource())
		}
	}

	// The same names with another source, gone or present: AlreadyExists.
	for _, req := range []*csi.CreateVolumeRequest{restoreReq(fromVol), restoreReq(fromOther), restoreReq(nil),
		cloneReq(fromSnap), cloneReq(fromOther)} {
		if _, err := td.ctrl.CreateVolume(ctx, req); status.Code(err) != codes.AlreadyExists {
			t.Errorf("CreateVolume %s with source %v: %v, want AlreadyExists", req.Name, req.GetVolumeContentSource(), err)
		}
	}
	// A new name from the deleted source is still NotFound.
	req := restoreReq(fromSnap)
	req.Name = "retry-new"
	if _, err := td.ctrl.CreateVolume(ctx, req); status.Code(err) != codes.NotFound {
		t.Errorf("CreateVolume of a new volume from a deleted snapshot: %v, want NotFound", err)
	}
}
