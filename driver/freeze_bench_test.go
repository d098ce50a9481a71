package driver

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/driver/internal/fsop"
	"github.com/cowcsi/cowcsi/test/testutil"
)

// BenchmarkQuiesce compares, on one staged ext4 volume, the FUSE-dependent
// steps of a snapshot made in this process (as before package fsop) and in
// a child process, and times a whole CreateSnapshot (and its delete).
// Every iteration first dirties the filesystem with a small unsynced write.
func BenchmarkQuiesce(b *testing.B) {
	testutil.RequireRoot(b, nodeNeeds...)
	env := newTestEnv(b)
	td := startDriver(b, env)
	ctx := context.Background()
	vol, err := td.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{
		Name: "pvc-bench", VolumeCapabilities: []*csi.VolumeCapability{mountCap(rwo, "ext4")},
		CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
	})
	if err != nil {
		b.Fatal(err)
	}
	id := vol.GetVolume().GetVolumeId()
	staging := filepath.Join(env.root, "staging", id)
	if _, err := td.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{
		VolumeId: id, StagingTargetPath: staging, VolumeCapability: mountCap(rwo, "ext4"),
	}); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		td.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
	})
	dev := td.d.node.get(id).LoopDevice
	dirty := func(b *testing.B, i int) {
		b.StopTimer()
		if err := writeFileNoSync(filepath.Join(staging, "f"), fmt.Sprintf("iteration %d\n", i)); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	steps := []struct {
		name string
		f    func(i int) error
	}{
		{"flush/in-process", func(int) error { return fsyncHere(dev) }},
		{"flush/child", func(int) error { return fsop.Flush(ctx, dev) }},
		{"freeze-flush-thaw/in-process", func(int) error {
			thaw, err := freezeHere(staging)
			if err != nil {
				return err
			}
			if err := fsyncHere(dev); err != nil {
				thaw()
				return err
			}
			return thaw()
		}},
		{"freeze-flush-thaw/child", func(int) error {
			f, err := fsop.StartFreeze(ctx, staging, dev, 10*time.Second)
			if err != nil {
				return err
			}
			return f.Thaw(ctx)
		}},
		{"CreateSnapshot+Delete", func(i int) error {
			resp, err := td.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: fmt.Sprintf("bench-%d", i), SourceVolumeId: id})
			if err != nil {
				return err
			}
			_, err = td.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: resp.GetSnapshot().GetSnapshotId()})
			return err
		}},
	}
	for _, s := range steps {
		b.Run(s.name, func(b *testing.B) {
			for i := 0; b.Loop(); i++ {
				dirty(b, i)
				if err := s.f(i); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func fsyncHere(dev string) error {
	fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return unix.Fsync(fd)
}

func writeFileNoSync(path, s string) error {
	fd, err := unix.Open(path, unix.O_WRONLY|unix.O_CREAT|unix.O_TRUNC|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	_, err = unix.Write(fd, []byte(s))
	return err
}
