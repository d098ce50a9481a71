package driver

import (
	"context"
	"os"
	"os/exec"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
)

// TestNodeExpand grows staged, published volumes online through
// NodeExpandVolume (the only expansion path, see doc.go): engine volume,
// FUSE file, loop device and filesystem.
func TestNodeExpand(t *testing.T) {
	env, td := startNodeDriver(t)
	ctx := context.Background()

	tests := []struct {
		name       string
		vc         *csi.VolumeCapability
		size, grow int64
		skip       func() string
	}{
		{"ext4", mountCap(rwo, "ext4"), 64 << 20, 200 << 20, func() string {
			if !hasCapSysResource() {
				return "growing a mounted ext4 needs CAP_SYS_RESOURCE"
			}
			return ""
		}},
		{"xfs", mountCap(rwo, "xfs"), 320 << 20, 512 << 20, func() string {
			if _, err := exec.LookPath("mkfs.xfs"); err != nil {
				return "needs mkfs.xfs"
			}
			return ""
		}},
		{"block", blockCap(rwo), 64 << 20, 200 << 20, func() string { return "" }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if why := tc.skip(); why != "" {
				t.Skip(why)
			}
			vol := createVolume(t, td, &csi.CreateVolumeRequest{Name: "expand-" + tc.name,
				VolumeCapabilities: []*csi.VolumeCapability{tc.vc}, CapacityRange: &csi.CapacityRange{RequiredBytes: tc.size}})
			pv := stageAndPublish(t, td, env, vol.GetVolumeId(), tc.vc)
			before := statSize(t, pv.target)

			resp, err := td.node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: pv.id, VolumePath: pv.target,
				VolumeCapability: tc.vc, CapacityRange: &csi.CapacityRange{RequiredBytes: tc.grow}})
			if err != nil {
				t.Fatalf("NodeExpandVolume: %v", err)
			}
			if resp.GetCapacityBytes() != tc.grow {
				t.Errorf("capacity %d, want %d", resp.GetCapacityBytes(), tc.grow)
			}
			after := statSize(t, pv.target)
			if after <= before || (tc.vc.GetBlock() != nil && after != tc.grow) {
				t.Errorf("size seen by users: %d -> %d (want growth to about %d)", before, after, tc.grow)
			}
			// A retry (the kubelet does retry) is a no-op that succeeds.
			if resp, err := td.node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: pv.id, VolumePath: pv.staging,
				CapacityRange: &csi.CapacityRange{RequiredBytes: tc.grow}}); err != nil || resp.GetCapacityBytes() != tc.grow {
				t.Errorf("retry: %v %v", resp, err)
			}
			// The new size is what ListVolumes reports.
			lv, err := td.ctrl.ListVolumes(ctx, &csi.ListVolumesRequest{})
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range lv.GetEntries() {
				if e.GetVolume().GetVolumeId() == pv.id {
					if e.GetVolume().GetCapacityBytes() != tc.grow {
						t.Errorf("ListVolumes capacity %d, want %d", e.GetVolume().GetCapacityBytes(), tc.grow)
					}
					if ids := e.GetStatus().GetPublishedNodeIds(); len(ids) != 1 || ids[0] != env.nodeID {
						t.Errorf("published node IDs %v", ids)
					}
				}
			}
		})
	}
}

// statSize is the size a user of the published path sees: the filesystem
// size, or the block device size.
func statSize(t *testing.T, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeDevice != 0 {
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		n, err := unix.IoctlGetUint64(int(f.Fd()), unix.BLKGETSIZE64)
		if err != nil {
			t.Fatal(err)
		}
		return int64(n)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Blocks) * st.Bsize
}
