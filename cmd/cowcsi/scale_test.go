package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/cowcsi/cowcsi/cow/loopdev"
	"github.com/cowcsi/cowcsi/test/testutil"
)

// scaleVolumes is how many volumes TestScale stages: COWCSI_SCALE (make
// scale sets 500), or a small default for go test.
func scaleVolumes(t *testing.T) int {
	n := envInt(t, "COWCSI_SCALE", 24)
	if n < 2 {
		t.Fatalf("COWCSI_SCALE=%d: want at least 2 volumes", n)
	}
	return n
}

// TestScale stages many volumes on one driver, a tenth of them ext4 and
// the rest block: every volume is staged, published and written, every one
// snapshotted, the driver restarted, a few snapshots restored and checked,
// and all volumes unstaged and deleted. It logs the driver's descriptors,
// RSS and threads, the loop devices in use and how long each step took.
func TestScale(t *testing.T) {
	testutil.RequireRoot(t, testutil.DevFUSE, testutil.DevLoopControl, "mkfs.ext4", "mount", "blkid")
	n := scaleVolumes(t)
	nFS := max(n/10, 1)
	root := t.TempDir()
	t.Cleanup(func() { cleanupUnder(t, root) })
	sock, store := filepath.Join(testutil.SocketDir(t), "csi.sock"), filepath.Join(root, "store")
	p := startPluginArgs(t, sock, store, nil)
	t.Cleanup(func() {
		if p == nil {
			return // stopped by the test, not restarted
		}
		left, _ := loopdev.BindingsUnder(root)
		p.term(t)
		clearLoopsOf(t, left)
	})
	idle := procFigures(t, p.cmd.Process.Pid)
	t.Logf("idle driver: %s", idle)

	vols := newFleet(root, n-nFS, nFS)
	const size = 32 << 20
	start := time.Now()
	if err := parallel(vols, 4, func(v *fleetVol) error { return v.bringUp(p, size) }); err != nil {
		t.Fatal(err)
	}
	t.Logf("created, staged, published and written %d volumes in %v", n, time.Since(start).Round(time.Millisecond))
	bound, err := loopdev.BindingsUnder(root)
	if err != nil || len(bound) != n {
		t.Errorf("%d loop devices bound to the driver's files, want %d (%v)", len(bound), n, err)
	}
	t.Logf("%d volumes staged (%d ext4): %s; loop devices %d, highest %s", n, nFS, procFigures(t, p.cmd.Process.Pid), len(bound), highestLoop(bound))

	ctx := context.Background()
	snaps, err := snapshotAll(p, vols)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d volumes and %d snapshots: %s", n, len(snaps), procFigures(t, p.cmd.Process.Pid))

	// A restart at full load: the stop syncs every volume within its
	// timeout, and the next instance serves them all again.
	start = time.Now()
	p.term(t)
	t.Logf("stopped with %d volumes staged in %v", n, time.Since(start).Round(time.Millisecond))
	p = nil
	start = time.Now()
	p = startPluginArgs(t, sock, store, nil)
	t.Logf("restarted and recovered %d volumes in %v: %s", n, time.Since(start).Round(time.Millisecond), procFigures(t, p.cmd.Process.Pid))
	if err := parallel(vols, 4, func(v *fleetVol) error { return v.check() }); err != nil {
		t.Errorf("after the restart: %v", err)
	}

	// The first block and the last (ext4) volume's snapshots, after
	// their sources moved on: the restores show the old data.
	for _, src := range []*fleetVol{vols[0], vols[n-1]} {
		checkRestore(t, p, root, src, snaps[src], size)
	}

	if err := parallel(vols, 4, func(v *fleetVol) error {
		if err := v.check(); err != nil {
			return err
		}
		if err := v.tearDown(p); err != nil {
			return err
		}
		_, err := p.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snaps[v]})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if left, _ := loopdev.BindingsUnder(root); len(left) > 0 {
		t.Errorf("%d loop devices still bound after unstaging every volume", len(left))
	}
	t.Logf("all unstaged and deleted: %s", procFigures(t, p.cmd.Process.Pid))
}

// snapshotAll snapshots every volume and checks its data after; it
// returns the snapshot IDs.
func snapshotAll(p *plugin, vols []*fleetVol) (map[*fleetVol]string, error) {
	snaps := make(map[*fleetVol]string, len(vols))
	var mu sync.Mutex
	err := parallel(vols, 4, func(v *fleetVol) error {
		resp, err := p.ctrl.CreateSnapshot(context.Background(), &csi.CreateSnapshotRequest{Name: "snap-" + v.name, SourceVolumeId: v.id})
		if err != nil {
			return err
		}
		mu.Lock()
		snaps[v] = resp.GetSnapshot().GetSnapshotId()
		mu.Unlock()
		return v.check()
	})
	return snaps, err
}

// checkRestore overwrites src's data, restores snap (taken before) into a
// new volume, checks that it has src's old data and removes it.
func checkRestore(t *testing.T, p *plugin, root string, src *fleetVol, snap string, size int64) {
	t.Helper()
	old := src.want
	if err := src.write("<" + src.name + " after the snapshot>"); err != nil {
		t.Fatal(err)
	}
	r := &fleetVol{name: "restore-" + src.name, block: src.block, staging: filepath.Join(root, "staging", "restore-"+src.name),
		target: filepath.Join(root, "pods", "restore-"+src.name, "vol"), want: old}
	if err := restore(p, r, snap, size); err != nil {
		t.Fatalf("restore %s: %v", r.name, err)
	}
	if err := r.check(); err != nil {
		t.Errorf("%s: %v", r.name, err)
	}
	if err := r.tearDown(p); err != nil {
		t.Error(err)
	}
}

// restore creates r from snapshot snap and stages and publishes it.
func restore(p *plugin, r *fleetVol, snap string, size int64) error {
	ctx := context.Background()
	vc := r.capability()
	resp, err := p.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: r.name, VolumeCapabilities: []*csi.VolumeCapability{vc},
		CapacityRange: &csi.CapacityRange{RequiredBytes: size},
		VolumeContentSource: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
			Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap}}}})
	if err != nil {
		return err
	}
	r.id = resp.GetVolume().GetVolumeId()
	if err := os.MkdirAll(r.staging, 0o750); err != nil {
		return err
	}
	if _, err := p.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: r.id, StagingTargetPath: r.staging, VolumeCapability: vc}); err != nil {
		return err
	}
	_, err = p.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: r.id, StagingTargetPath: r.staging, TargetPath: r.target, VolumeCapability: vc})
	return err
}

// procFigures describes process pid's descriptors (and their soft limit),
// resident memory (now and peak) and threads.
func procFigures(t *testing.T, pid int) string {
	t.Helper()
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	field := func(name string) string {
		for _, l := range strings.Split(string(status), "\n") {
			if v, ok := strings.CutPrefix(l, name+":"); ok {
				return strings.Join(strings.Fields(v), " ")
			}
		}
		return "?"
	}
	limits, _ := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	nofile := "?"
	for _, l := range strings.Split(string(limits), "\n") {
		if strings.HasPrefix(l, "Max open files") {
			if f := strings.Fields(l); len(f) >= 5 {
				nofile = f[3] + "/" + f[4]
			}
		}
	}
	return fmt.Sprintf("fds %d (RLIMIT_NOFILE %s), VmRSS %s, VmHWM %s, threads %s",
		len(fds), nofile, field("VmRSS"), field("VmHWM"), field("Threads"))
}

// highestLoop names the highest-numbered device of bound.
func highestLoop(bound []loopdev.Binding) string {
	best, name := -1, "none"
	for _, b := range bound {
		if k, err := strconv.Atoi(strings.TrimPrefix(b.Path, "/dev/loop")); err == nil && k > best {
			best, name = k, b.Path
		}
	}
	return name
}
