package cow_test

import (
	"encoding/binary"
	"fmt"
	"math/rand"
	"testing"

	"github.com/cowcsi/cowcsi/cow"
)

// TestLayerNumbersReused takes and deletes snapshots, restores and clones
// many times more often than there are layer numbers: freed numbers must be
// reused, and the data of the volume, of a snapshot kept all along and of
// the clones must stay right, across reopens.
func TestLayerNumbersReused(t *testing.T) {
	seed := testSeed(t)
	rng := rand.New(rand.NewSource(seed))
	ctx := t.Context()
	const limit = 17 // numbers 1 to 16
	const size = 64 * cow.BlockSize
	s := openStore(t, fastTempDir(t))
	cow.SetLayerLimit(s, limit)
	if _, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: "v", Size: size}); err != nil {
		t.Fatal(err)
	}
	img := make([]byte, size)
	write := func(v *cow.Volume, img []byte) {
		t.Helper()
		p := make([]byte, cow.BlockSize*(1+rng.Intn(3)))
		rng.Read(p)
		off := int64(rng.Intn(size/cow.BlockSize-3)) * cow.BlockSize
		if _, err := v.WriteAt(p, off); err != nil {
			t.Fatalf("WriteAt(%s, %d): %v", v.ID(), off, err)
		}
		copy(img[off:], p)
	}
	v, err := s.OpenVolume(ctx, "v")
	if err != nil {
		t.Fatal(err)
	}
	write(v, img)
	if _, err := s.CreateSnapshot(ctx, cow.SnapshotSpec{ID: "keep", VolumeID: "v"}); err != nil {
		t.Fatal(err)
	}
	keep := append([]byte(nil), img...)

	snaps := map[string][]byte{} // live snapshots besides keep
	round := 0
	rounds := func(n int) {
		t.Helper()
		for range n {
			round++
			write(v, img)
			id := fmt.Sprintf("s%d", round)
			if _, err := s.CreateSnapshot(ctx, cow.SnapshotSpec{ID: id, VolumeID: "v"}); err != nil {
				t.Fatalf("round %d: CreateSnapshot(%s): %v", round, id, err)
			}
			snaps[id] = append([]byte(nil), img...)
			if round%5 == 0 {
				// A clone of the volume, written and deleted.
				cimg := append([]byte(nil), img...)
				if _, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: "c", Size: size, SourceVolume: "v"}); err != nil {
					t.Fatalf("round %d: clone: %v", round, err)
				}
				cv, err := s.OpenVolume(ctx, "c")
				if err != nil {
					t.Fatal(err)
				}
				write(cv, cimg)
				if d := diffAt(readAll(t, cv), cimg); d != "" {
					t.Fatalf("round %d: clone: %s", round, d)
				}
				if err := cv.Close(); err != nil {
					t.Fatal(err)
				}
				if err := s.DeleteVolume(ctx, "c"); err != nil {
					t.Fatal(err)
				}
			}
			// Keep one or two snapshots besides keep, delete the others.
			for old := range snaps {
				if old != id && (len(snaps) > 2 || rng.Intn(2) == 0) {
					if err := s.DeleteSnapshot(ctx, old); err != nil {
						t.Fatalf("round %d: DeleteSnapshot(%s): %v", round, old, err)
					}
					delete(snaps, old)
				}
			}
			if err := s.WaitIdle(ctx); err != nil {
				t.Fatalf("round %d: WaitIdle: %v", round, err)
			}
			if n := cow.LiveLayers(s); n >= limit-1 {
				t.Fatalf("round %d: %d live layers", round, n)
			}
		}
		mustCheck(t, s)
		if d := diffAt(readAll(t, v), img); d != "" {
			t.Fatalf("after round %d: volume: %s", round, d)
		}
		if d := diffAt(readSnapshot(ctx, t, s, "keep", "tmp"), keep); d != "" {
			t.Fatalf("after round %d: snapshot keep: %s", round, d)
		}
		for id, want := range snaps {
			if d := diffAt(readSnapshot(ctx, t, s, id, "tmp"), want); d != "" {
				t.Fatalf("after round %d: snapshot %s: %s", round, id, d)
			}
		}
	}
	rounds(8 * limit)
	reopen := func() {
		t.Helper()
		if err := v.Close(); err != nil {
			t.Fatal(err)
		}
		s = reopenStore(t, s, cow.Options{})
		cow.SetLayerLimit(s, limit)
		if v, err = s.OpenVolume(ctx, "v"); err != nil {
			t.Fatal(err)
		}
	}
	reopen()
	rounds(4 * limit)
	reopen()
	rounds(2 * limit)
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d snapshots and %d clones with %d layer numbers", round, round/5, limit-1)
}

// TestLayerNumbersReusedUnderIO reuses layer numbers while the volume is
// read and written: a read must never resolve a number that was freed or
// given to another layer. Every block written holds its own block number
// and a checksum, so a read from the wrong layer or place shows.
func TestLayerNumbersReusedUnderIO(t *testing.T) {
	seed := testSeed(t)
	ctx := t.Context()
	const limit = 17
	const blocks = 256
	s := openStore(t, fastTempDir(t))
	cow.SetLayerLimit(s, limit)
	if _, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: "v", Size: blocks * cow.BlockSize}); err != nil {
		t.Fatal(err)
	}
	v, err := s.OpenVolume(ctx, "v")
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	stop := make(chan struct{})
	errc := make(chan error, 3)
	io := func(worker int) {
		rng := rand.New(rand.NewSource(seed + int64(worker)))
		p := make([]byte, 4*cow.BlockSize)
		for gen := uint64(1); ; gen++ {
			select {
			case <-stop:
				errc <- nil
				return
			default:
			}
			b := rng.Intn(blocks - 4)
			if worker == 0 {
				for i := range 4 {
					selfCheckedBlock(p[i*cow.BlockSize:(i+1)*cow.BlockSize], uint64(b+i), gen)
				}
				if _, err := v.WriteAt(p, int64(b)*cow.BlockSize); err != nil {
					errc <- fmt.Errorf("WriteAt block %d: %w", b, err)
					return
				}
				continue
			}
			if _, err := v.ReadAt(p, int64(b)*cow.BlockSize); err != nil {
				errc <- fmt.Errorf("ReadAt block %d: %w", b, err)
				return
			}
			for i := range 4 {
				if err := checkSelfCheckedBlock(p[i*cow.BlockSize:(i+1)*cow.BlockSize], uint64(b+i)); err != nil {
					errc <- err
					return
				}
			}
		}
	}
	for w := range 3 {
		go io(w)
	}
	for round := 1; round <= 10*limit; round++ {
		id := fmt.Sprintf("s%d", round)
		if _, err := s.CreateSnapshot(ctx, cow.SnapshotSpec{ID: id, VolumeID: "v"}); err != nil {
			close(stop)
			t.Fatalf("round %d: CreateSnapshot: %v", round, err)
		}
		if round > 2 {
			if err := s.DeleteSnapshot(ctx, fmt.Sprintf("s%d", round-2)); err != nil {
				close(stop)
				t.Fatalf("round %d: DeleteSnapshot: %v", round, err)
			}
		}
		if err := s.WaitIdle(ctx); err != nil {
			close(stop)
			t.Fatalf("round %d: WaitIdle: %v", round, err)
		}
	}
	close(stop)
	for range 3 {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	mustCheck(t, s)
}

// selfCheckedBlock fills p (one block) with block number b, generation gen
// and a checksum of both.
func selfCheckedBlock(p []byte, b, gen uint64) {
	clear(p)
	binary.LittleEndian.PutUint64(p[0:], b)
	binary.LittleEndian.PutUint64(p[8:], gen)
	binary.LittleEndian.PutUint64(p[16:], b*0x9E3779B97F4A7C15^gen)
}

// checkSelfCheckedBlock accepts a block of zeros (never written) or one
// selfCheckedBlock wrote for block b.
func checkSelfCheckedBlock(p []byte, b uint64) error {
	got, gen, sum := binary.LittleEndian.Uint64(p[0:]), binary.LittleEndian.Uint64(p[8:]), binary.LittleEndian.Uint64(p[16:])
	if got == 0 && gen == 0 && sum == 0 && allZero(p) {
		return nil
	}
	if got != b || sum != b*0x9E3779B97F4A7C15^gen || !allZero(p[24:]) {
		return fmt.Errorf("block %d reads as block %d generation %d (checksum %#x)", b, got, gen, sum)
	}
	return nil
}

func allZero(p []byte) bool {
	for _, c := range p {
		if c != 0 {
			return false
		}
	}
	return true
}
