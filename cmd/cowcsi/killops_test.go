package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// The operations a trial runs against the driver until it is killed, and
// the kill itself.

// killMode is how a trial chooses its kill moment.
type killMode string

const (
	// modeSnap: a tight CreateSnapshot loop; the kill follows the start
	// of a random call by a few milliseconds, so it often lands while
	// the driver flushes or freezes.
	modeSnap killMode = "snapshot-loop"
	// modeMix: snapshots, NodeStage/NodeUnstage, expansion; the kill
	// comes at a random moment.
	modeMix killMode = "mix"
	// modeTerm: as mix, then SIGTERM; the kill lands in the graceful
	// shutdown (which syncs every volume).
	modeTerm killMode = "sigterm-then-kill"
)

func (tr *killTrial) pickMode() killMode {
	switch r := tr.rng.IntN(20); {
	case r < 10:
		return modeSnap
	case r < 16:
		return modeMix
	default:
		return modeTerm
	}
}

// begin and end track the calls in flight, to say what the kill hit.
func (tr *killTrial) begin(call string) {
	tr.mu.Lock()
	tr.running[call]++
	tr.mu.Unlock()
}

func (tr *killTrial) end(call string) {
	tr.mu.Lock()
	tr.running[call]--
	tr.mu.Unlock()
}

func (tr *killTrial) inFlight() string {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	var out []string
	for c, n := range tr.running {
		if n > 0 {
			out = append(out, c)
		}
	}
	sort.Strings(out)
	if len(out) == 0 {
		return "none"
	}
	return strings.Join(out, "+")
}

// snapshot asks for a snapshot of v (with freeze, the default) and
// records it if the call returns OK.
func (tr *killTrial) snapshot(ctx context.Context, p *plugin, v killVolume, calls chan<- struct{}) {
	tr.mu.Lock()
	tr.nextID++
	name := fmt.Sprintf("%s-s%d", tr.prefix, tr.nextID)
	tr.mu.Unlock()
	acked := tr.writer.fsAcked.Load()
	if v.block {
		acked = tr.writer.blkAcked.Load()
	}
	tr.begin("CreateSnapshot")
	select {
	case calls <- struct{}{}:
	default:
	}
	resp, err := p.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: v.id})
	tr.end("CreateSnapshot")
	if err == nil {
		tr.mu.Lock()
		tr.snaps = append(tr.snaps, snapRecord{name: name, id: resp.GetSnapshot().GetSnapshotId(), block: v.block,
			ackedAt: acked, sizeBytes: resp.GetSnapshot().GetSizeBytes()})
		tr.mu.Unlock()
	}
}

// snapLoop snapshots the two written volumes, at random, until ctx ends.
func (tr *killTrial) snapLoop(ctx context.Context, p *plugin, rng *rand.Rand, calls chan<- struct{}) {
	for ctx.Err() == nil {
		v := tr.fs
		if rng.IntN(2) == 0 {
			v = tr.blk
		}
		tr.snapshot(ctx, p, v, calls)
	}
}

// mixLoop runs random operations until ctx ends: snapshots, stage and
// unstage of the third volume, NodeExpandVolume of a written volume and
// ControllerExpandVolume (which the driver does not offer: Unimplemented).
func (tr *killTrial) mixLoop(ctx context.Context, p *plugin, rng *rand.Rand) {
	staged := false
	size := map[string]int64{tr.blk.id: killVolSize, tr.fs.id: killVolSize}
	for ctx.Err() == nil {
		switch r := rng.IntN(10); {
		case r < 3:
			v := tr.fs
			if rng.IntN(2) == 0 {
				v = tr.blk
			}
			tr.snapshot(ctx, p, v, nil)
		case r < 7:
			staged = tr.toggleStage(ctx, p, staged)
		case r < 9:
			v := tr.fs
			if rng.IntN(2) == 0 {
				v = tr.blk
			}
			if size[v.id] < 4*killVolSize {
				size[v.id] = tr.nodeExpand(ctx, p, v, size[v.id]+4<<20)
			}
		default:
			tr.begin("ControllerExpandVolume")
			_, err := p.ctrl.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: tr.fs.id,
				CapacityRange: &csi.CapacityRange{RequiredBytes: 2 * killVolSize}})
			tr.end("ControllerExpandVolume")
			if c := status.Code(err); ctx.Err() == nil && c != codes.Unimplemented && c != codes.Unavailable {
				tr.t.Errorf("ControllerExpandVolume: %v, want Unimplemented (no EXPAND_VOLUME controller capability)", err)
			}
		}
	}
}

func (tr *killTrial) toggleStage(ctx context.Context, p *plugin, staged bool) bool {
	if staged {
		tr.begin("NodeUnstageVolume")
		_, err := p.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: tr.extra.id, StagingTargetPath: tr.extra.staging})
		tr.end("NodeUnstageVolume")
		return err != nil
	}
	tr.begin("NodeStageVolume")
	err := tr.stage(ctx, p, tr.extra)
	tr.end("NodeStageVolume")
	return err == nil
}

// nodeExpand grows v to want and returns its size as the driver reports
// it (the old one on error).
func (tr *killTrial) nodeExpand(ctx context.Context, p *plugin, v killVolume, want int64) int64 {
	tr.begin("NodeExpandVolume")
	resp, err := p.node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{VolumeId: v.id, VolumePath: v.target,
		StagingTargetPath: v.staging, CapacityRange: &csi.CapacityRange{RequiredBytes: want}, VolumeCapability: killCap(v.block)})
	tr.end("NodeExpandVolume")
	if err != nil {
		return want - 4<<20
	}
	return resp.GetCapacityBytes()
}

// killRecord says how a kill went: mode, when, and what it hit.
type killRecord struct {
	mode     killMode
	inFlight string
	at       time.Time
}

// runUntilKill runs mode's operations on p and kills p with SIGKILL at a
// moment chosen by the trial's seed. The operations have stopped when it
// returns.
func (tr *killTrial) runUntilKill(p *plugin, mode killMode) killRecord {
	ctx, cancel := context.WithCancel(context.Background())
	calls := make(chan struct{}, 1)
	var wg sync.WaitGroup
	rngSnap := rand.New(rand.NewPCG(uint64(tr.seed), 1))
	rngMix := rand.New(rand.NewPCG(uint64(tr.seed), 2))
	wg.Go(func() { tr.snapLoop(ctx, p, rngSnap, calls) })
	if mode != modeSnap {
		wg.Go(func() { tr.mixLoop(ctx, p, rngMix) })
	}
	// The delays below choose the kill moment at random; they order
	// nothing.
	switch mode {
	case modeSnap:
		// Kill after the start of the n-th call, or after a while if
		// the calls stall (a wedged freeze).
		stall := time.After(10 * time.Second)
	wait:
		for n := 1 + tr.rng.IntN(40); n > 0; n-- {
			select {
			case <-calls:
			case <-stall:
				break wait
			}
		}
		time.Sleep(time.Duration(tr.rng.IntN(4000)) * time.Microsecond)
	case modeMix:
		time.Sleep(time.Duration(20+tr.rng.IntN(1000)) * time.Millisecond)
	case modeTerm:
		time.Sleep(time.Duration(20+tr.rng.IntN(500)) * time.Millisecond)
		p.cmd.Process.Signal(syscall.SIGTERM)
		time.Sleep(time.Duration(tr.rng.IntN(300)) * time.Millisecond)
	}
	rec := killRecord{mode: mode, inFlight: tr.inFlight(), at: time.Now()}
	p.cmd.Process.Signal(syscall.SIGKILL)
	cancel()
	wg.Wait()
	p.conn.Close()
	return rec
}
