package main

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/moby/sys/mountinfo"
)

// runKillTrial is one trial of TestKillRandom: setup, operations and a
// kill, then the checks.
func runKillTrial(t *testing.T, bin string, seed int64, kw *kmsgWatch, st *killStats) {
	ph := phases{last: time.Now()}
	tr := newKillTrial(t, bin, seed, kw)
	p, transport, err := tr.launch()
	if err != nil {
		t.Fatalf("start: %v", err)
	}
	if err := tr.setup(p); err != nil {
		t.Fatalf("setup: %v", err)
	}
	nblocks := int64(killVolSize / blockSize)
	tr.writer, err = startWriter(tr.blk.target, filepath.Join(tr.fs.target, "log"), nblocks, uint64(seed), tr.log)
	if err != nil {
		t.Fatalf("start writer: %v", err)
	}
	select {
	case <-tr.writer.started:
	case <-time.After(callTimeout):
		t.Fatalf("the writer acknowledged no write on both volumes within %v", callTimeout)
	}
	kmsgBefore := 0
	if kw != nil {
		kmsgBefore, _ = kw.count()
	}
	ph.mark("setup")
	mode := tr.pickMode()
	kill := tr.runUntilKill(p, mode)
	ph.mark("operations")
	t.Logf("transport %s, mode %s, killed during %s, %d snapshots OK, acked %d blocks and %d records",
		transport, mode, kill.inFlight, len(tr.snaps), tr.writer.blkAcked.Load(), tr.writer.fsAcked.Load())
	st.add(transport, kill)

	tr.checkKilledExit(p, transport, kill)
	ph.mark("exit")
	p2, _, err := tr.launch()
	if err != nil {
		t.Fatalf("restart on the same store after the kill: %v", err)
	}
	ph.mark("restart")
	tr.checkAfterRestart(p2, &ph, st)
	tr.checkKilledConn(p, transport, kmsgBefore, st)
	p2.term(t)
	ph.mark("stop")
	t.Logf("phases: %s", ph.String())
	st.durations = append(st.durations, ph.total)
}

// checkAfterRestart runs the checks that need the new driver p2 up.
func (tr *killTrial) checkAfterRestart(p2 *plugin, ph *phases, st *killStats) {
	tr.checkNotFrozen()
	ph.mark("frozen")
	if stuck := stuckInD(tr.old); stuck != "" {
		tr.t.Errorf("threads of processes this test started (the writer, the drivers, their children) stay in D state with the new driver up:\n%s", stuck)
	}
	ph.mark("D")
	tr.stopWriter()
	ph.mark("writer")
	tr.checkData()
	ph.mark("data")
	st.snapsOK += len(tr.snaps)
	st.restored += tr.checkSnapshots(p2)
	ph.mark("snapshots")
}

// phases times the steps of a trial.
type phases struct {
	last  time.Time
	total time.Duration
	b     strings.Builder
}

func (ph *phases) mark(name string) {
	d := time.Since(ph.last)
	ph.last, ph.total = time.Now(), ph.total+d
	fmt.Fprintf(&ph.b, "%s %v, ", name, d.Round(time.Millisecond))
}

func (ph *phases) String() string {
	return fmt.Sprintf("%stotal %v", ph.b.String(), ph.total.Round(time.Millisecond))
}

// checkKilledExit: the killed driver must exit within exitBound. If it
// does not, its threads are shown, this trial's FUSE connections aborted
// so that the machine is not left wedged, and the trial fails; it goes
// on (to see what else is broken) only if the abort let the process go.
func (tr *killTrial) checkKilledExit(p *plugin, transport string, kill killRecord) {
	if p.waitExit(exitBound) {
		return
	}
	dump := dumpProc(p.pid())
	conns := abortFuseUnder(tr.root)
	after := p.waitExit(exitBound)
	tr.t.Errorf("the killed driver (pid %d, transport %s, mode %s, killed during %s) did not exit within %v; its threads:\n%s"+
		"aborted this trial's FUSE connection(s) %v: the driver exited after the abort: %v",
		p.pid(), transport, kill.mode, kill.inFlight, exitBound, dump, conns, after)
	if !after {
		tr.t.FailNow()
	}
}

// checkNotFrozen probes every filesystem of the trial for a freeze: the
// ext4 volumes as the new driver staged them, and the ext4 volume as the
// writer's mount namespace still holds it (mounted by the killed driver).
// A frozen one is reported and thawed.
func (tr *killTrial) checkNotFrozen() {
	for _, p := range tr.freezable() {
		out, err := runProbe("freeze", p)
		switch {
		case err != nil:
			tr.t.Errorf("freeze probe: %v", err)
		case out == "frozen":
			th, _ := runProbe("thaw", p)
			tr.t.Errorf("filesystem at %s is left frozen after the kill (thaw by the test: %s)", p, th)
		case out != "ok":
			tr.t.Logf("freeze probe of %s: %s (not frozen)", p, out)
		}
	}
}

// stopWriter kills the writer, which must exit within exitBound, and
// reads its last acknowledgements.
func (tr *killTrial) stopWriter() {
	w := tr.writer
	w.cmd.Process.Kill()
	if !waitClosed(w.exited, exitBound) {
		tr.t.Errorf("the writer (pid %d) did not exit within %v of SIGKILL:\n%s", w.pid(), exitBound, dumpProc(w.pid()))
		return
	}
	if !waitClosed(w.drained, exitBound) {
		tr.t.Errorf("the writer's acknowledgement pipe stays open after its exit")
	}
	tr.t.Logf("writer: %s", strings.Join(w.errs, "; "))
}

// checkData reads both volumes back through the new driver's paths: the
// block volume's published device and the ext4 volume's staging mount.
func (tr *killTrial) checkData() {
	w := tr.writer
	blk, fs := w.blkAcked.Load(), w.fsAcked.Load()
	if err := checkBlocks(tr.blk.target, killVolSize/blockSize, blk, blk+1, uint64(tr.seed)); err != nil {
		tr.t.Errorf("acknowledged writes lost after the restart: %v", err)
	}
	if err := checkRecords(filepath.Join(tr.fs.staging, "log"), fs, uint64(tr.seed)); err != nil {
		tr.t.Errorf("acknowledged appends lost after the restart: %v", err)
	}
}

// checkSnapshots: every snapshot that returned OK must be listed; a few
// (the last of each volume and one other at random) are restored, staged
// and checked for every write acknowledged before they were asked for.
// It returns how many were restored.
func (tr *killTrial) checkSnapshots(p *plugin) int {
	listed, err := listSnapshots(p)
	if err != nil {
		tr.t.Errorf("ListSnapshots after the restart: %v", err)
		return 0
	}
	var missing []string
	for _, s := range tr.snaps {
		if !slices.Contains(listed, s.id) {
			missing = append(missing, s.name)
		}
	}
	if len(missing) > 0 {
		tr.t.Errorf("%d of %d snapshots that returned OK are not listed after the restart: %v", len(missing), len(tr.snaps), missing)
	}
	picked := tr.pickRestores()
	for i, s := range picked {
		if err := tr.checkRestore(p, s, i); err != nil {
			tr.t.Errorf("snapshot %s (%s volume, acked %d when asked): %v", s.name, kindOf(s.block), s.ackedAt, err)
		}
	}
	return len(picked)
}

func kindOf(block bool) string {
	if block {
		return "block"
	}
	return "ext4"
}

// pickRestores chooses the snapshots to restore: the last OK of each
// volume and one more at random.
func (tr *killTrial) pickRestores() []snapRecord {
	var out []snapRecord
	for _, block := range []bool{true, false} {
		for i := len(tr.snaps) - 1; i >= 0; i-- {
			if tr.snaps[i].block == block {
				out = append(out, tr.snaps[i])
				break
			}
		}
	}
	if len(tr.snaps) > 0 {
		s := tr.snaps[tr.rng.IntN(len(tr.snaps))]
		if !slices.ContainsFunc(out, func(o snapRecord) bool { return o.id == s.id }) {
			out = append(out, s)
		}
	}
	return out
}

func listSnapshots(p *plugin) ([]string, error) {
	var ids []string
	token := ""
	for {
		ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
		resp, err := p.ctrl.ListSnapshots(ctx, &csi.ListSnapshotsRequest{StartingToken: token})
		cancel()
		if err != nil {
			return nil, err
		}
		for _, e := range resp.GetEntries() {
			ids = append(ids, e.GetSnapshot().GetSnapshotId())
		}
		if token = resp.GetNextToken(); token == "" {
			return ids, nil
		}
	}
}

// checkRestore restores s into a new volume, stages (and for a block
// volume publishes) it, checks its content and removes it again.
func (tr *killTrial) checkRestore(p *plugin, s snapRecord, i int) error {
	v, err := tr.createVolume(p, fmt.Sprintf("restore%d", i), s.block, s.id)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	if err := tr.stage(ctx, p, v); err != nil {
		return fmt.Errorf("stage the restored volume: %w", err)
	}
	w := tr.writer
	if s.block {
		if err := tr.publish(ctx, p, v); err != nil {
			return fmt.Errorf("publish the restored volume: %w", err)
		}
		err = checkBlocks(v.target, killVolSize/blockSize, s.ackedAt, w.blkAcked.Load()+1, uint64(tr.seed))
		if _, uerr := p.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target}); uerr != nil && err == nil {
			err = fmt.Errorf("unpublish: %w", uerr)
		}
	} else {
		err = checkRecords(filepath.Join(v.staging, "log"), s.ackedAt, uint64(tr.seed))
	}
	if _, uerr := p.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging}); uerr != nil && err == nil {
		err = fmt.Errorf("unstage: %w", uerr)
	}
	if _, derr := p.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.id}); derr != nil && err == nil {
		err = fmt.Errorf("delete: %w", derr)
	}
	return err
}

// checkKilledConn: once the killed driver is gone the kernel ends every
// request of its FUSE connection; a connection that keeps requests after
// the restart has a teardown that never completes (the FUSE io_uring case
// also logs "ent-req-queue" lines for ever). The kernel log is shared by
// the machine, so its lines alone do not fail the trial.
func (tr *killTrial) checkKilledConn(p *plugin, transport string, kmsgBefore int, st *killStats) {
	n, ok := tr.connOf[p.pid()]
	if !ok {
		return
	}
	lines, last := 0, ""
	if tr.kmsg != nil {
		c, l := tr.kmsg.count()
		lines, last = c-kmsgBefore, l
	}
	w, stuck := stuckConn(n, tr.root)
	for deadline := time.Now().Add(2 * time.Second); stuck && time.Now().Before(deadline); w, stuck = stuckConn(n, tr.root) {
		time.Sleep(50 * time.Millisecond) // polling kernel state
	}
	switch {
	case stuck:
		tr.t.Errorf("FUSE connection %d of the killed driver (transport %s) still holds %d request(s) after the restart: its teardown does not complete (%d %q kernel log lines since the kill; last: %s)",
			n, transport, w, lines, teardownLogMarker, last)
	case lines > 0:
		tr.t.Logf("the kernel logged %d %q lines during this trial, not from this trial's connection %d (another process on this machine); last: %s",
			lines, teardownLogMarker, n, last)
	}
	st.killedConns = append(st.killedConns, killedConn{conn: n, root: tr.root})
}

func isMountPoint(p string) (bool, error) { return mountinfo.Mounted(p) }
