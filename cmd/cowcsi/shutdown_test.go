package main

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/cowcsi/cowcsi/cow/loopdev"
	"github.com/cowcsi/cowcsi/test/testutil"
)

// TestShutdownWithinStopTimeout is the pod's grace period: 20 staged and
// published volumes (block and ext4) with fsynced data and more data not
// yet synced, and a snapshot in flight, when SIGTERM arrives. The process
// must exit within --stop-timeout (the kubelet kills it after the grace
// period), and the next instance must serve every volume with its fsynced
// data and list the snapshot if CreateSnapshot said OK.
func TestShutdownWithinStopTimeout(t *testing.T) {
	testutil.RequireRoot(t, testutil.DevFUSE, testutil.DevLoopControl, "mkfs.ext4", "mount", "blkid")
	const stopTimeout = 8 * time.Second
	root := t.TempDir()
	t.Cleanup(func() { cleanupUnder(t, root) })
	sock, store := filepath.Join(testutil.SocketDir(t), "csi.sock"), filepath.Join(root, "store")
	flags := []string{"--stop-timeout=" + stopTimeout.String(), "--v=2"}
	watch := newLogWatch()
	p1 := startPluginArgs(t, sock, store, watch, flags...)
	vols := newFleet(root, 10, 10)
	if err := parallel(vols, 4, func(v *fleetVol) error { return v.bringUp(p1, 64<<20) }); err != nil {
		p1.kill()
		t.Fatal(err)
	}
	// Loops still bound to the plugin's FUSE files after a failed run
	// outlive its FUSE mount under short names: note them now.
	staged, _ := loopdev.BindingsUnder(root)
	t.Cleanup(func() { clearLoopsOf(t, staged) })
	// Unsynced writes give the shutdown's syncs something to do.
	for _, v := range vols {
		if err := writeUnsynced(v, 4<<20); err != nil {
			p1.kill()
			t.Fatal(err)
		}
	}

	called := watch.seen(`method="/csi.v1.Controller/CreateSnapshot"`)
	snapped := make(chan error, 1)
	src := vols[len(vols)-1] // ext4: frozen for the snapshot
	go func() {
		_, err := p1.ctrl.CreateSnapshot(context.Background(), &csi.CreateSnapshotRequest{Name: "in-flight", SourceVolumeId: src.id})
		snapped <- err
	}()
	<-called
	start := time.Now()
	if err := p1.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	bound := stopTimeout + 2*time.Second // process exit and scheduling slack
	select {
	case <-p1.exited:
		err := p1.waitErr
		took := time.Since(start)
		t.Logf("exit %v after SIGTERM, with %d volumes staged and a snapshot in flight (--stop-timeout %v)", took.Round(time.Millisecond), len(vols), stopTimeout)
		if err != nil {
			t.Errorf("plugin exit after SIGTERM: %v", err)
		}
	case <-time.After(bound):
		p1.kill()
		t.Fatalf("plugin still running %v after SIGTERM (--stop-timeout %v)", bound, stopTimeout)
	}
	p1.conn.Close()
	snapErr := <-snapped
	t.Logf("CreateSnapshot in flight: %v", snapErr)

	p2 := startPluginArgs(t, sock, store, nil, flags...)
	t.Cleanup(func() {
		left, _ := loopdev.BindingsUnder(root)
		p2.term(t)
		clearLoopsOf(t, left)
	})
	for _, v := range vols {
		if err := v.check(); err != nil {
			t.Errorf("%s after the restart: %v", v.name, err)
		}
	}
	if snapErr == nil {
		checkListed(t, p2, src.id)
	}
	if err := parallel(vols, 4, func(v *fleetVol) error { return v.tearDown(p2) }); err != nil {
		t.Error(err)
	}
}

// checkListed checks that a snapshot of volume id is listed, and deletes
// the volume's snapshots.
func checkListed(t *testing.T, p *plugin, id string) {
	t.Helper()
	ctx := context.Background()
	resp, err := p.ctrl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{SourceVolumeId: id})
	found := false
	for _, e := range resp.GetEntries() {
		found = found || e.GetSnapshot().GetSourceVolumeId() == id
		if _, err := p.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: e.GetSnapshot().GetSnapshotId()}); err != nil {
			t.Errorf("DeleteSnapshot: %v", err)
		}
	}
	if err != nil || !found {
		t.Errorf("the snapshot acknowledged before SIGTERM is not listed after the restart: %v", err)
	}
}

// writeUnsynced writes n bytes after the volume's checked data and does
// not sync them: dirty pages for the shutdown (or a snapshot) to flush.
func writeUnsynced(v *fleetVol, n int) error {
	path := v.dataPath()
	if !v.block {
		path = filepath.Join(v.target, "unsynced")
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	buf := make([]byte, n)
	for i := range buf {
		buf[i] = byte(i*7 + 1)
	}
	_, err = f.WriteAt(buf, 1<<20)
	return errors.Join(err, f.Close())
}

// TestShutdownOverrun: the stop runs out of time with most syncs still
// under way (a tiny --stop-timeout, 96 MiB of dirty pages on each of 20
// volumes). The process must still exit at once, and the next instance
// must find every volume with its fsynced data: the abandoned syncs lose
// only writes nobody was told are durable.
//
// The abandoned syncs run in child processes (driver/internal/fsop): one
// left in the driver's own process would keep a thread of it in D state on
// its own FUSE connection, and with FUSE over io_uring that wedges the
// process and the connection until reboot.
func TestShutdownOverrun(t *testing.T) {
	testutil.RequireRoot(t, testutil.DevFUSE, testutil.DevLoopControl, "mkfs.ext4", "mount", "blkid")
	const stopTimeout = 200 * time.Millisecond
	root := t.TempDir()
	t.Cleanup(func() { cleanupUnder(t, root) })
	sock, store := filepath.Join(testutil.SocketDir(t), "csi.sock"), filepath.Join(root, "store")
	flags := []string{"--stop-timeout=" + stopTimeout.String()}
	if v := os.Getenv("COWCSI_FUSE_IO_URING"); v != "" {
		flags = append(flags, "--fuse-io-uring="+v)
	}
	p1 := startPluginArgs(t, sock, store, nil, flags...)
	vols := newFleet(root, 10, 10)
	if err := parallel(vols, 4, func(v *fleetVol) error { return v.bringUp(p1, 128<<20) }); err != nil {
		p1.kill()
		t.Fatal(err)
	}
	staged, _ := loopdev.BindingsUnder(root)
	t.Cleanup(func() { clearLoopsOf(t, staged) })
	for _, v := range vols {
		if err := writeUnsynced(v, 96<<20); err != nil {
			p1.kill()
			t.Fatal(err)
		}
	}
	start := time.Now()
	if err := p1.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	bound := stopTimeout + 5*time.Second // process exit and scheduling slack
	select {
	case <-p1.exited:
		err := p1.waitErr
		t.Logf("exit (%v) %v after SIGTERM, --stop-timeout %v", err, time.Since(start).Round(time.Millisecond), stopTimeout)
	case <-time.After(bound):
		// Not killed: a process that cannot exit cannot be killed either.
		t.Fatalf("plugin still running %v after SIGTERM (--stop-timeout %v)", bound, stopTimeout)
	}
	p1.conn.Close()

	p2 := startPluginArgs(t, sock, store, nil, flags...)
	t.Cleanup(func() {
		left, _ := loopdev.BindingsUnder(root)
		p2.term(t)
		clearLoopsOf(t, left)
	})
	for _, v := range vols {
		if err := v.check(); err != nil {
			t.Errorf("%s after the restart: %v", v.name, err)
		}
	}
	if err := parallel(vols, 4, func(v *fleetVol) error { return v.tearDown(p2) }); err != nil {
		t.Error(err)
	}
}
