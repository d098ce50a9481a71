package driver

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// TestSnapshotChainLifecycle takes a chain of snapshots of a published
// block volume (unsynced writes between them), then deletes the source
// volume and the snapshots in random order while restoring from the
// remaining ones: volumes and snapshots are independent (CSI), and every
// restore must show exactly the blocks written before its snapshot.
func TestSnapshotChainLifecycle(t *testing.T) {
	env, td := startNodeDriver(t)
	ctx := context.Background()
	seed := rand.Uint64()
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, seed))

	const n = 8
	const chunk = 256 << 10
	vc := blockCap(rwo)
	src := createVolume(t, td, &csi.CreateVolumeRequest{Name: "chain-src", VolumeCapabilities: []*csi.VolumeCapability{vc},
		CapacityRange: &csi.CapacityRange{RequiredBytes: 16 << 20}})
	srcID := src.GetVolumeId()
	pv := publishedVolume{id: srcID, staging: env.root + "/staging-chain", target: env.root + "/pods/chain/dev"}
	os.MkdirAll(pv.staging, 0o750)
	if _, err := td.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: srcID, StagingTargetPath: pv.staging, VolumeCapability: vc}); err != nil {
		t.Fatal(err)
	}
	if _, err := td.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: srcID, StagingTargetPath: pv.staging, TargetPath: pv.target, VolumeCapability: vc}); err != nil {
		t.Fatal(err)
	}
	pattern := func(i int) []byte {
		s := fmt.Sprintf("<snapshot %d>", i)
		return bytes.Repeat([]byte(s), chunk/len(s)+1)[:chunk]
	}

	dev, err := os.OpenFile(pv.target, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	snaps := make([]string, n)
	for i := range n {
		// Chunk i gets pattern i; chunk 0 is overwritten every time, so
		// each snapshot has its own version of it. No fsync: the
		// snapshot's flush of the loop device must pick them up.
		if _, err := dev.WriteAt(pattern(i), int64(i+1)*chunk); err != nil {
			t.Fatal(err)
		}
		if _, err := dev.WriteAt(pattern(i), 0); err != nil {
			t.Fatal(err)
		}
		resp, err := td.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: fmt.Sprintf("chain-%d", i), SourceVolumeId: srcID})
		if err != nil {
			t.Fatalf("snapshot %d: %v", i, err)
		}
		snaps[i] = resp.GetSnapshot().GetSnapshotId()
	}
	dev.Close()
	unpublishAndUnstage(t, td, pv)
	// The source goes first: snapshots outlive their volume.
	if _, err := td.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: srcID}); err != nil {
		t.Fatal(err)
	}

	check := func(i int) {
		t.Helper()
		name := fmt.Sprintf("chain-restore-%d-%d", i, rng.Uint32())
		resp, err := td.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, VolumeCapabilities: []*csi.VolumeCapability{vc},
			VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
				Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snaps[i]}}}})
		if err != nil {
			t.Fatalf("restore %d: %v", i, err)
		}
		id := resp.GetVolume().GetVolumeId()
		rp := publishedVolume{id: id, staging: env.root + "/staging-" + id, target: env.root + "/pods/" + id + "/dev"}
		os.MkdirAll(rp.staging, 0o750)
		if _, err := td.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: rp.staging, VolumeCapability: vc}); err != nil {
			t.Fatal(err)
		}
		if _, err := td.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: rp.staging, TargetPath: rp.target, VolumeCapability: vc}); err != nil {
			t.Fatal(err)
		}
		b := readDirect(t, rp.target, int64(n+1)*chunk)
		if !bytes.Equal(b[:chunk], pattern(i)) {
			t.Errorf("restore of snapshot %d: chunk 0 is not version %d", i, i)
		}
		for j := range n {
			got := b[(j+1)*chunk : (j+2)*chunk]
			want := make([]byte, chunk)
			if j <= i {
				want = pattern(j)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("restore of snapshot %d: chunk %d wrong (want pattern %d: %v)", i, j+1, j, j <= i)
			}
		}
		unpublishAndUnstage(t, td, rp)
		if _, err := td.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
			t.Fatal(err)
		}
	}

	order := rng.Perm(n)
	alive := map[int]bool{}
	for i := range n {
		alive[i] = true
	}
	for _, victim := range order {
		// Restore from a random survivor, then delete the victim.
		for i := range alive {
			check(i)
			break
		}
		if _, err := td.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snaps[victim]}); err != nil {
			t.Fatalf("delete snapshot %d: %v", victim, err)
		}
		delete(alive, victim)
	}
	if resp, err := td.ctrl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{}); err != nil || len(resp.GetEntries()) != 0 {
		t.Errorf("snapshots left: %v %v", resp.GetEntries(), err)
	}
}

// readDirect reads the first size bytes of a block device with O_DIRECT
// (into a page-aligned buffer). Buffered reads of a loop device on a FUSE
// file were measured 50-200 times slower here (page-cache readahead in
// small requests), and the test is about content, not the page cache.
func readDirect(t *testing.T, path string, size int64) []byte {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf, err := unix.Mmap(-1, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(buf)
	if _, err := f.ReadAt(buf, 0); err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	return append([]byte(nil), buf...)
}
