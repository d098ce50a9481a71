package driver

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/cowcsi/cowcsi/test/testutil"
)

// TestRestart stops the driver gracefully with a filesystem volume and a
// block volume staged and published, starts a new instance on the same
// store, and checks that both paths work again and that data written and
// synced before the stop is there.
func TestRestart(t *testing.T) {
	env, td1 := startNodeDriver(t)

	fsVol := createVolume(t, td1, &csi.CreateVolumeRequest{Name: "restart-fs"})
	blkVol := createVolume(t, td1, &csi.CreateVolumeRequest{Name: "restart-blk", VolumeCapabilities: []*csi.VolumeCapability{blockCap(rwo)}})
	fsPV := stageAndPublishNoCleanup(t, td1, env, fsVol.GetVolumeId(), mountCap(rwo, "ext4"))
	blkPV := stageAndPublishNoCleanup(t, td1, env, blkVol.GetVolumeId(), blockCap(rwo))

	fsData := importantContent("before restart")
	writeSynced(t, filepath.Join(fsPV.target, "data.txt"), fsData, 0)
	blkData := importantContent("raw block")[:1<<20]
	writeSynced(t, blkPV.target, blkData, 4<<20)

	td1.stop(t)

	td2 := startDriver(t, env)
	deleteWith := func(id string) {
		t.Cleanup(func() {
			if _, err := td2.ctrl.DeleteVolume(context.Background(), &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
				t.Errorf("DeleteVolume %s: %v", id, err)
			}
		})
	}
	deleteWith(fsVol.GetVolumeId())
	deleteWith(blkVol.GetVolumeId())
	// The new instance owns the volumes now: cleanups go through it
	// (LIFO: unpublish and unstage run before the deletes).
	t.Cleanup(func() { unpublishAndUnstage(t, td2, fsPV) })
	t.Cleanup(func() { unpublishAndUnstage(t, td2, blkPV) })

	// What the kubelet would do after a plugin restart: stage and publish
	// again; both must be idempotent on the recovered state.
	ctx := context.Background()
	for _, c := range []struct {
		pv publishedVolume
		vc *csi.VolumeCapability
	}{{fsPV, mountCap(rwo, "ext4")}, {blkPV, blockCap(rwo)}} {
		if _, err := td2.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: c.pv.id, StagingTargetPath: c.pv.staging, VolumeCapability: c.vc}); err != nil {
			t.Errorf("NodeStageVolume after restart: %v", err)
		}
		if _, err := td2.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: c.pv.id, StagingTargetPath: c.pv.staging,
			TargetPath: c.pv.target, VolumeCapability: c.vc}); err != nil {
			t.Errorf("NodePublishVolume after restart: %v", err)
		}
		h, err := td2.node.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{VolumeId: c.pv.id})
		if err != nil || len(h.GetVolumeHealth().GetHealthStatuses()) != 0 {
			t.Errorf("health of %s after restart: %v %v", c.pv.id, h.GetVolumeHealth().GetHealthStatuses(), err)
		}
	}

	if got, err := os.ReadFile(filepath.Join(fsPV.target, "data.txt")); err != nil || !bytes.Equal(got, fsData) {
		t.Errorf("data.txt after restart: %d bytes (want %d), err %v", len(got), len(fsData), err)
	}
	if got, err := os.ReadFile(filepath.Join(fsPV.staging, "data.txt")); err != nil || !bytes.Equal(got, fsData) {
		t.Errorf("data.txt at the staging path after restart: %d bytes, err %v", len(got), err)
	}
	got := make([]byte, len(blkData))
	if f, err := os.Open(blkPV.target); err != nil {
		t.Errorf("open block target after restart: %v", err)
	} else {
		if _, err := f.ReadAt(got, 4<<20); err != nil || !bytes.Equal(got, blkData) {
			t.Errorf("block data after restart differs (err %v)", err)
		}
		f.Close()
	}
	// The recovered volume takes new writes.
	writeSynced(t, filepath.Join(fsPV.target, "after.txt"), []byte("after restart"), 0)
}

// writeSynced writes data at off and fsyncs: acknowledged data that must
// survive a restart.
func writeSynced(t *testing.T, path string, data []byte, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(data, off); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

// TestSocketMode checks the socket's permissions: 0600, or 0660 with
// SocketGroupAccess.
func TestSocketMode(t *testing.T) {
	testutil.RequireRoot(t, nodeNeeds...)
	for _, group := range []bool{false, true} {
		env := newTestEnv(t)
		opts := testOptions(env)
		opts.SocketGroupAccess = group
		td := startDriverWith(t, opts, DefaultDeps())
		path, _ := socketPath(opts.Endpoint)
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		want := os.FileMode(0o600)
		if group {
			want = 0o660
		}
		if fi.Mode().Perm() != want || fi.Mode()&os.ModeSocket == 0 {
			t.Errorf("socket mode %v, want socket %v", fi.Mode(), want)
		}
		td.stop(t)
		if _, err := os.Stat(path); !os.IsNotExist(err) {
			t.Errorf("socket left after stop: %v", err)
		}
	}
}
