package cow_test

import (
	"bytes"
	"context"
	"errors"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/cow"
	"github.com/cowcsi/cowcsi/cow/internal/blockio"
)

// doPlan does a write plan's writes as the FUSE ring does, then commits and
// releases it.
func doPlan(t *testing.T, pl *blockio.Plan) {
	t.Helper()
	if !pl.Write || len(pl.Segs) == 0 {
		t.Fatalf("plan: write %v, %d segments", pl.Write, len(pl.Segs))
	}
	for _, sg := range pl.Segs {
		if n, err := unix.Pwrite(sg.Fd, sg.Buf, sg.Off); err != nil || n != len(sg.Buf) {
			pl.Release()
			t.Fatalf("pwrite of a planned segment: %d, %v", n, err)
		}
	}
	pl.Commit()
	pl.Release()
}

// TestPlanWrite: large writes to blocks the head owns are planned as
// direct writes of its data file; others are left to WriteAt.
func TestPlanWrite(t *testing.T) {
	const size = 4 << 20
	s, v, _ := volumeIn(t, diskTempDir(t), size)
	ctx := context.Background()
	old := chunkData(1, 0, size)
	if _, err := v.WriteAt(old, 0); err != nil {
		t.Fatal(err)
	}
	w := alignedBuf(512 << 10)
	copy(w, chunkData(2, 0, len(w)))
	pl, err := v.PlanWrite(w, 12288)
	if err != nil || pl == nil {
		t.Fatalf("PlanWrite of 512 KiB of owned blocks: %v, %v", pl, err)
	}
	if len(pl.Segs) != 1 || pl.Segs[0].Off != 12288 || pl.N != len(w) {
		t.Fatalf("plan: %+v", pl)
	}
	doPlan(t, pl)
	want := bytes.Clone(old)
	copy(want[12288:], w)
	got := make([]byte, size)
	if _, err := v.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read after the planned write: %v, equal %v", err, bytes.Equal(got, want))
	}
	// Not planned: small, or unaligned buffer, offset or length.
	const big = 256 << 10
	for _, c := range []struct {
		name string
		p    []byte
		off  int64
	}{
		{"small", alignedBuf(4096), 0},
		{"buffer", alignedBuf(big + 1)[1:], 0},
		{"offset", alignedBuf(big), 100},
		{"length", alignedBuf(big + 4096)[:big+1000], 0},
	} {
		if pl, err := v.PlanWrite(c.p, c.off); pl != nil || err != nil {
			t.Errorf("PlanWrite, %s: %v, %v; want neither", c.name, pl, err)
		}
	}
	if pl, err := v.PlanWrite(alignedBuf(big), size); !errors.Is(err, cow.ErrInvalid) {
		t.Errorf("PlanWrite past the end: %v, %v; want ErrInvalid", pl, err)
	}
	// After a snapshot the new head owns nothing: not planned (copy-up and
	// the ownership record are WriteAt's), until WriteAt made it owned.
	if _, err := s.CreateSnapshot(ctx, cow.SnapshotSpec{ID: "s", VolumeID: "v"}); err != nil {
		t.Fatal(err)
	}
	if pl, err := v.PlanWrite(w, 12288); pl != nil || err != nil {
		t.Fatalf("PlanWrite of blocks the head does not own: %v, %v", pl, err)
	}
	if _, err := v.WriteAt(make([]byte, len(w)), 12288); err != nil {
		t.Fatal(err)
	}
	pl, err = v.PlanWrite(w, 12288)
	if err != nil || pl == nil {
		t.Fatalf("PlanWrite after WriteAt made the blocks owned: %v, %v", pl, err)
	}
	doPlan(t, pl)
	if _, err := v.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatal("read after the second planned write: wrong data")
	}
	// The snapshot kept what was there before.
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := readSnapshot(ctx, t, s, "s", "r"); !bytes.Equal(got, want) {
		t.Fatalf("snapshot: not the data before it: %s", diffAt(got, want))
	}
}

// TestPlanWriteHoldsBarrier: a snapshot waits for planned writes in
// flight, and while it waits, nothing the FUSE ring's thread calls waits
// for it (PlanWrite, PlanRead, ReadAtNoWait say EAGAIN instead), or the
// ring could never complete the write the snapshot waits for.
func TestPlanWriteHoldsBarrier(t *testing.T) {
	const size = 1 << 20
	s, v, _ := volumeIn(t, diskTempDir(t), size)
	ctx := context.Background()
	if _, err := v.WriteAt(chunkData(3, 0, size), 0); err != nil {
		t.Fatal(err)
	}
	w := alignedBuf(256 << 10)
	copy(w, chunkData(4, 0, len(w)))
	pl, err := v.PlanWrite(w, 0)
	if err != nil || pl == nil {
		t.Fatalf("PlanWrite: %v, %v", pl, err)
	}
	snapped := make(chan error, 1)
	go func() {
		_, err := s.CreateSnapshot(ctx, cow.SnapshotSpec{ID: "s", VolumeID: "v"})
		snapped <- err
	}()
	// The snapshot now waits for the barrier (or will soon): the calls
	// must not wait for it, and must say so once it is wanted.
	deadline := time.Now().Add(10 * time.Second)
	buf := alignedBuf(len(w))
	for {
		select {
		case err := <-snapped:
			t.Fatalf("snapshot done while a planned write was in flight: %v", err)
		default:
		}
		_, rerr := v.ReadAtNoWait(buf, 512<<10)
		p2, werr := v.PlanWrite(buf, 512<<10)
		if p2 != nil {
			p2.Release()
		}
		p3, perr := v.PlanRead(buf, 512<<10)
		if p3 != nil {
			p3.Release()
		}
		if errors.Is(werr, syscall.EAGAIN) && errors.Is(perr, syscall.EAGAIN) && errors.Is(rerr, syscall.EAGAIN) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("with a snapshot waiting: ReadAtNoWait %v, PlanWrite %v, PlanRead %v; want EAGAIN", rerr, werr, perr)
		}
		time.Sleep(time.Millisecond)
	}
	doPlan(t, pl)
	if err := <-snapped; err != nil {
		t.Fatal(err)
	}
	// The write completed before the snapshot: the snapshot has it.
	if got := readSnapshot(ctx, t, s, "s", "r"); !bytes.Equal(got[:len(w)], w) {
		t.Fatal("snapshot taken after a planned write completed: not its data")
	}
}
