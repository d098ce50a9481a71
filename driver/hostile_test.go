package driver

import (
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// treeOutside lists every path below dir except the store directory, so a
// test can assert that hostile calls create or remove nothing elsewhere.
func treeOutside(t *testing.T, dir, store string) []string {
	t.Helper()
	var out []string
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if p == store {
			return filepath.SkipDir
		}
		out = append(out, p)
		return nil
	})
	sort.Strings(out)
	return out
}

// TestHostileInput sends malformed, hostile and impossible requests and
// checks the status code of each, then that nothing was created or removed
// outside the store directory.
func TestHostileInput(t *testing.T) {
	env, td := startNodeDriver(t)
	ctx := context.Background()

	// A volume staged and published, a volume only created, a snapshot.
	staged := createVolume(t, td, &csi.CreateVolumeRequest{Name: "hostile-staged"})
	pv := stageAndPublish(t, td, env, staged.GetVolumeId(), mountCap(rwo, "ext4"))
	idle := createVolume(t, td, &csi.CreateVolumeRequest{Name: "hostile-idle"})
	snap := snapshot(t, td, "hostile-snap", idle.GetVolumeId(), nil)

	// A foreign mount-less directory with content where a target could be.
	foreign := filepath.Join(env.root, "foreign")
	os.MkdirAll(foreign, 0o755)
	os.WriteFile(filepath.Join(foreign, "keep"), []byte("x"), 0o644)
	// Canary next to the store: "../x" must never reach it.
	parent := filepath.Dir(env.root)
	beforeRoot := treeOutside(t, env.root, env.storeDir)
	beforeParent, _ := os.ReadDir(parent)

	rel := "relative/path"
	long := strings.Repeat("n", maxNameLength+1)
	mc := mountCap(rwo, "ext4")
	snapSrc := func(id string) *csi.VolumeContentSource {
		return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: id}}}
	}
	volSrc := func(id string) *csi.VolumeContentSource {
		return &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: id}}}
	}
	cv := func(name string, mut func(*csi.CreateVolumeRequest)) func() error {
		return func() error {
			req := &csi.CreateVolumeRequest{Name: name, VolumeCapabilities: []*csi.VolumeCapability{mc},
				CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20}}
			if mut != nil {
				mut(req)
			}
			_, err := td.ctrl.CreateVolume(ctx, req)
			return err
		}
	}
	otherNode := &csi.Topology{Segments: map[string]string{TopologyKey: "some-other-node"}}

	tests := []struct {
		name string
		call func() error
		want codes.Code
	}{
		// CreateVolume
		{"create: empty name", cv("", nil), codes.InvalidArgument},
		{"create: oversized name", cv(long, nil), codes.InvalidArgument},
		{"create: no capabilities", cv("h1", func(r *csi.CreateVolumeRequest) { r.VolumeCapabilities = nil }), codes.InvalidArgument},
		{"create: nil capability", cv("h1", func(r *csi.CreateVolumeRequest) { r.VolumeCapabilities = []*csi.VolumeCapability{nil} }), codes.InvalidArgument},
		{"create: multi-node access", cv("h1", func(r *csi.CreateVolumeRequest) {
			r.VolumeCapabilities = []*csi.VolumeCapability{mountCap(csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER, "")}
		}), codes.InvalidArgument},
		{"create: unsupported fs", cv("h1", func(r *csi.CreateVolumeRequest) {
			r.VolumeCapabilities = []*csi.VolumeCapability{mountCap(rwo, "ntfs")}
		}), codes.InvalidArgument},
		{"create: negative size", cv("h1", func(r *csi.CreateVolumeRequest) { r.CapacityRange.RequiredBytes = -1 }), codes.InvalidArgument},
		{"create: negative limit", cv("h1", func(r *csi.CreateVolumeRequest) { r.CapacityRange.LimitBytes = -1 }), codes.InvalidArgument},
		{"create: huge size", cv("h1", func(r *csi.CreateVolumeRequest) { r.CapacityRange.RequiredBytes = 1 << 62 }), codes.OutOfRange},
		{"create: max int64 size", cv("h1", func(r *csi.CreateVolumeRequest) { r.CapacityRange.RequiredBytes = 1<<63 - 1 }), codes.OutOfRange},
		{"create: limit below required", cv("h1", func(r *csi.CreateVolumeRequest) { r.CapacityRange.LimitBytes = 1 << 20 }), codes.OutOfRange},
		{"create: limit below 4 KiB multiple", cv("h1", func(r *csi.CreateVolumeRequest) {
			r.CapacityRange = &csi.CapacityRange{RequiredBytes: 100, LimitBytes: 200}
		}), codes.OutOfRange},
		{"create: source snapshot bigger than limit", cv("h1", func(r *csi.CreateVolumeRequest) {
			r.VolumeContentSource = snapSrc(snap.GetSnapshotId())
			r.CapacityRange = &csi.CapacityRange{LimitBytes: 1 << 20}
		}), codes.OutOfRange},
		{"create: unknown source snapshot", cv("h1", func(r *csi.CreateVolumeRequest) {
			r.VolumeContentSource = snapSrc("snap-0123456789abcdef0123456789abcdef")
		}), codes.NotFound},
		{"create: traversal source snapshot", cv("h1", func(r *csi.CreateVolumeRequest) { r.VolumeContentSource = snapSrc("../x") }), codes.NotFound},
		{"create: traversal source volume", cv("h1", func(r *csi.CreateVolumeRequest) { r.VolumeContentSource = volSrc("a/b") }), codes.NotFound},
		{"create: unknown source volume", cv("h1", func(r *csi.CreateVolumeRequest) {
			r.VolumeContentSource = volSrc("vol-0123456789abcdef0123456789abcdef")
		}), codes.NotFound},
		{"create: empty content source", cv("h1", func(r *csi.CreateVolumeRequest) { r.VolumeContentSource = &csi.VolumeContentSource{} }), codes.InvalidArgument},
		{"create: unknown parameter", cv("h1", func(r *csi.CreateVolumeRequest) { r.Parameters = map[string]string{"fsType": "ext4"} }), codes.InvalidArgument},
		{"create: other node only", cv("h1", func(r *csi.CreateVolumeRequest) {
			r.AccessibilityRequirements = &csi.TopologyRequirement{Requisite: []*csi.Topology{otherNode}}
		}), codes.ResourceExhausted},
		{"create: same name, other size", cv("hostile-idle", func(r *csi.CreateVolumeRequest) { r.CapacityRange.RequiredBytes = 128 << 20 }), codes.AlreadyExists},
		{"create: same name, other source", cv("hostile-idle", func(r *csi.CreateVolumeRequest) { r.VolumeContentSource = snapSrc(snap.GetSnapshotId()) }), codes.AlreadyExists},
		{"create: same name, other parameters", cv("hostile-idle", func(r *csi.CreateVolumeRequest) {
			r.Parameters = map[string]string{"csi.storage.k8s.io/pvc/name": "x"}
		}), codes.AlreadyExists},

		// DeleteVolume
		{"delete volume: empty", func() error { _, err := td.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{}); return err }, codes.InvalidArgument},
		{"delete volume: traversal", func() error {
			_, err := td.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: "../x"})
			return err
		}, codes.InvalidArgument},
		{"delete volume: slash", func() error {
			_, err := td.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: "a/b"})
			return err
		}, codes.InvalidArgument},
		{"delete volume: staged", func() error {
			_, err := td.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: staged.GetVolumeId()})
			return err
		}, codes.FailedPrecondition},
		{"delete volume: unknown is success", func() error {
			_, err := td.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: "vol-ffffffffffffffffffffffffffffffff"})
			return err
		}, codes.OK},

		// Snapshots
		{"snapshot: empty name", func() error {
			_, err := td.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: idle.GetVolumeId()})
			return err
		}, codes.InvalidArgument},
		{"snapshot: oversized name", func() error {
			_, err := td.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: long, SourceVolumeId: idle.GetVolumeId()})
			return err
		}, codes.InvalidArgument},
		{"snapshot: no source", func() error {
			_, err := td.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s1"})
			return err
		}, codes.InvalidArgument},
		{"snapshot: traversal source", func() error {
			_, err := td.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s1", SourceVolumeId: "../x"})
			return err
		}, codes.NotFound},
		{"snapshot: unknown source", func() error {
			_, err := td.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s1", SourceVolumeId: "vol-0123456789abcdef0123456789abcdef"})
			return err
		}, codes.NotFound},
		{"snapshot: bad freeze value", func() error {
			_, err := td.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s1", SourceVolumeId: idle.GetVolumeId(), Parameters: map[string]string{paramFreeze: "maybe"}})
			return err
		}, codes.InvalidArgument},
		{"snapshot: unknown parameter", func() error {
			_, err := td.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s1", SourceVolumeId: idle.GetVolumeId(), Parameters: map[string]string{"cowcsi.io/frieze": "false"}})
			return err
		}, codes.InvalidArgument},
		{"snapshot: same name, other source", func() error {
			_, err := td.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "hostile-snap", SourceVolumeId: staged.GetVolumeId()})
			return err
		}, codes.AlreadyExists},
		{"delete snapshot: traversal", func() error {
			_, err := td.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: "../../etc"})
			return err
		}, codes.InvalidArgument},
		{"get snapshot: unknown", func() error {
			_, err := td.ctrl.GetSnapshot(ctx, &csi.GetSnapshotRequest{SnapshotId: "snap-0123456789abcdef0123456789abcdef"})
			return err
		}, codes.NotFound},

		// Lists and queries
		{"list volumes: bad token", func() error {
			_, err := td.ctrl.ListVolumes(ctx, &csi.ListVolumesRequest{StartingToken: "garbage"})
			return err
		}, codes.Aborted},
		{"list volumes: traversal token", func() error {
			_, err := td.ctrl.ListVolumes(ctx, &csi.ListVolumesRequest{StartingToken: listTokenPrefix + "../x"})
			return err
		}, codes.Aborted},
		{"list volumes: negative max", func() error { _, err := td.ctrl.ListVolumes(ctx, &csi.ListVolumesRequest{MaxEntries: -1}); return err }, codes.InvalidArgument},
		{"list snapshots: bad token", func() error {
			_, err := td.ctrl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{StartingToken: "garbage"})
			return err
		}, codes.Aborted},
		{"validate: traversal", func() error {
			_, err := td.ctrl.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: "../x", VolumeCapabilities: []*csi.VolumeCapability{mc}})
			return err
		}, codes.InvalidArgument},
		{"validate: unknown", func() error {
			_, err := td.ctrl.ValidateVolumeCapabilities(ctx, &csi.ValidateVolumeCapabilitiesRequest{VolumeId: "vol-0123456789abcdef0123456789abcdef", VolumeCapabilities: []*csi.VolumeCapability{mc}})
			return err
		}, codes.NotFound},
		{"controller expand: not offered", func() error {
			_, err := td.ctrl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: idle.GetVolumeId()})
			return err
		}, codes.Unimplemented},

		// Node
		{"stage: traversal id", func() error {
			_, err := td.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: "../x", StagingTargetPath: filepath.Join(env.root, "st"), VolumeCapability: mc})
			return err
		}, codes.InvalidArgument},
		{"stage: relative staging path", func() error {
			_, err := td.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: idle.GetVolumeId(), StagingTargetPath: rel, VolumeCapability: mc})
			return err
		}, codes.InvalidArgument},
		{"stage: unclean staging path", func() error {
			_, err := td.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: idle.GetVolumeId(), StagingTargetPath: env.root + "/a/../../escape", VolumeCapability: mc})
			return err
		}, codes.InvalidArgument},
		{"stage: no capability", func() error {
			_, err := td.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: idle.GetVolumeId(), StagingTargetPath: filepath.Join(env.root, "st")})
			return err
		}, codes.InvalidArgument},
		{"stage: capability without access type", func() error {
			_, err := td.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: idle.GetVolumeId(), StagingTargetPath: filepath.Join(env.root, "st"),
				VolumeCapability: &csi.VolumeCapability{AccessMode: &csi.VolumeCapability_AccessMode{Mode: rwo}}})
			return err
		}, codes.InvalidArgument},
		{"stage: unknown volume", func() error {
			_, err := td.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: "vol-0123456789abcdef0123456789abcdef", StagingTargetPath: filepath.Join(env.root, "st"), VolumeCapability: mc})
			return err
		}, codes.NotFound},
		{"stage: staged elsewhere", func() error {
			_, err := td.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: staged.GetVolumeId(), StagingTargetPath: filepath.Join(env.root, "st"), VolumeCapability: mc})
			return err
		}, codes.FailedPrecondition},
		{"stage: same path, incompatible capability", func() error {
			_, err := td.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: staged.GetVolumeId(), StagingTargetPath: pv.staging, VolumeCapability: blockCap(rwo)})
			return err
		}, codes.AlreadyExists},
		{"publish: not staged", func() error {
			_, err := td.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: idle.GetVolumeId(), StagingTargetPath: filepath.Join(env.root, "st"),
				TargetPath: filepath.Join(env.root, "t"), VolumeCapability: mc})
			return err
		}, codes.FailedPrecondition},
		{"publish: relative target", func() error {
			_, err := td.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: staged.GetVolumeId(), StagingTargetPath: pv.staging, TargetPath: rel, VolumeCapability: mc})
			return err
		}, codes.InvalidArgument},
		{"publish: same target, other readonly", func() error {
			_, err := td.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: staged.GetVolumeId(), StagingTargetPath: pv.staging, TargetPath: pv.target, VolumeCapability: mc, Readonly: true})
			return err
		}, codes.AlreadyExists},
		{"publish: block on a mount staging", func() error {
			_, err := td.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: staged.GetVolumeId(), StagingTargetPath: pv.staging, TargetPath: filepath.Join(env.root, "t"), VolumeCapability: blockCap(rwo)})
			return err
		}, codes.InvalidArgument},
		{"unpublish: foreign directory left alone", func() error {
			_, err := td.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: staged.GetVolumeId(), TargetPath: foreign})
			return err
		}, codes.OK},
		{"unstage: traversal id", func() error {
			_, err := td.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: "../x", StagingTargetPath: pv.staging})
			return err
		}, codes.InvalidArgument},
		{"unstage: published volume", func() error {
			_, err := td.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: staged.GetVolumeId(), StagingTargetPath: pv.staging})
			return err
		}, codes.FailedPrecondition},
		{"expand: shrink below current size", func() error {
			_, err := td.node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: staged.GetVolumeId(), VolumePath: pv.target,
				CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 20, LimitBytes: 1 << 20}})
			return err
		}, codes.OutOfRange},
		{"expand: negative", func() error {
			_, err := td.node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: staged.GetVolumeId(), VolumePath: pv.target,
				CapacityRange: &csi.CapacityRange{RequiredBytes: -5}})
			return err
		}, codes.InvalidArgument},
		{"expand: huge", func() error {
			_, err := td.node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: staged.GetVolumeId(), VolumePath: pv.target,
				CapacityRange: &csi.CapacityRange{RequiredBytes: 1 << 62}})
			return err
		}, codes.OutOfRange},
		{"expand: path not the volume's", func() error {
			_, err := td.node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: staged.GetVolumeId(), VolumePath: "/etc",
				CapacityRange: &csi.CapacityRange{RequiredBytes: 128 << 20}})
			return err
		}, codes.NotFound},
		{"stats: path not the volume's", func() error {
			_, err := td.node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: staged.GetVolumeId(), VolumePath: "/"})
			return err
		}, codes.NotFound},
		{"health: traversal", func() error {
			_, err := td.node.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: "../x"})
			return err
		}, codes.InvalidArgument},
	}
	// GetCapacity is topology-aware: another node's segment has none here.
	if c, err := td.ctrl.GetCapacity(ctx, &csi.GetCapacityRequest{AccessibleTopology: otherNode}); err != nil || c.GetAvailableCapacity() != 0 {
		t.Errorf("GetCapacity for another node: %v %v", c, err)
	}
	if c, err := td.ctrl.GetCapacity(ctx, &csi.GetCapacityRequest{AccessibleTopology: &csi.Topology{Segments: map[string]string{TopologyKey: env.nodeID}}}); err != nil || c.GetAvailableCapacity() <= 0 {
		t.Errorf("GetCapacity for this node: %v %v", c, err)
	}

	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.call()
			if got := status.Code(err); got != tc.want {
				t.Errorf("code %v (%v), want %v", got, err, tc.want)
			}
		})
	}

	// Names are only hashed: "../x" and "a/b" are fine volume names that
	// land in the store like any other.
	for _, name := range []string{"../x", "a/b", "/etc/passwd", "..", "\u202e-rtl-name"} {
		v := createVolume(t, td, &csi.CreateVolumeRequest{Name: name})
		if !strings.HasPrefix(v.GetVolumeId(), volumeIDPrefix) || v.GetVolumeId() != volumeIDFor(name) {
			t.Errorf("name %q: volume ID %q", name, v.GetVolumeId())
		}
	}

	if after := treeOutside(t, env.root, env.storeDir); strings.Join(after, "\n") != strings.Join(beforeRoot, "\n") {
		t.Errorf("files outside the store changed:\nbefore %v\nafter  %v", beforeRoot, after)
	}
	afterParent, _ := os.ReadDir(parent)
	if len(afterParent) != len(beforeParent) {
		t.Errorf("entries next to the test directory changed: %d -> %d", len(beforeParent), len(afterParent))
	}
	if _, err := os.Stat(filepath.Join(foreign, "keep")); err != nil {
		t.Errorf("foreign file removed: %v", err)
	}
}
