package cow_test

import (
	"errors"
	"path/filepath"
	"testing"
	"time"

	"github.com/cowcsi/cowcsi/cow"
)

// TestFullStoreRecovers fills a store until merges fail for lack of space,
// then deletes a snapshot whose layer can simply be removed. The removal
// must not wait behind the failing merges; the merges must keep retrying
// and succeed once there is space; the store must reopen clean.
func TestFullStoreRecovers(t *testing.T) {
	mnt := mountSmallExt4(t, 64<<20)
	seed := testSeed(t)
	ctx := t.Context()
	s := openStore(t, filepath.Join(mnt, "store"))

	// A snapshot of a deleted volume: its layer (the oldest number) has
	// no child and is removed, not merged, once the snapshot goes.
	ov := writeVolume(t, s, "old", 32<<20, 0, 24, seed, 0)
	if err := ov.Close(); err != nil {
		t.Fatalf("Close(old): %v", err)
	}
	if _, err := s.CreateSnapshot(ctx, cow.SnapshotSpec{ID: "old-snap", VolumeID: "old"}); err != nil {
		t.Fatalf("CreateSnapshot(old-snap): %v", err)
	}
	if err := s.DeleteVolume(ctx, "old"); err != nil {
		t.Fatalf("DeleteVolume(old): %v", err)
	}
	if err := s.WaitIdle(ctx); err != nil {
		t.Fatalf("WaitIdle: %v", err)
	}

	// keep: two snapshots whose layers must be merged (copied into their
	// child) once deleted, which takes space.
	want := make([]byte, 16<<20)
	kv := writeVolume(t, s, "keep", int64(len(want)), 0, 8, seed, 100)
	copy(want, readAll(t, kv))
	if _, err := s.CreateSnapshot(ctx, cow.SnapshotSpec{ID: "k1", VolumeID: "keep"}); err != nil {
		t.Fatalf("CreateSnapshot(k1): %v", err)
	}
	writeChunks(t, kv, want, 4, 8, seed, 200)
	if _, err := s.CreateSnapshot(ctx, cow.SnapshotSpec{ID: "k2", VolumeID: "keep"}); err != nil {
		t.Fatalf("CreateSnapshot(k2): %v", err)
	}
	writeChunks(t, kv, want, 12, 13, seed, 300)
	if err := kv.Flush(); err != nil {
		t.Fatalf("Flush(keep): %v", err)
	}

	fillStore(t, s, "pad", seed)
	_, freeFull, err := s.Capacity()
	if err != nil {
		t.Fatal(err)
	}

	// Deleting k1 and k2 needs merges, which fail for lack of space and
	// are retried.
	before := cow.GCFailures(s)
	for _, id := range []string{"k1", "k2"} {
		if err := s.DeleteSnapshot(ctx, id); err != nil {
			t.Fatalf("DeleteSnapshot(%s) on a full store: %v", id, err)
		}
	}
	waitFor(t, 30*time.Second, "3 failed merge passes", func() bool { return cow.GCFailures(s)-before >= 3 })
	if d := diffAt(readAll(t, kv), want); d != "" {
		t.Fatalf("keep while its merges fail: %s", d)
	}

	// Deleting old-snap alone frees its space at once, whatever the merges.
	if err := s.DeleteSnapshot(ctx, "old-snap"); err != nil {
		t.Fatalf("DeleteSnapshot(old-snap): %v", err)
	}
	var freeAfter int64
	waitFor(t, 30*time.Second, "old-snap's space to be freed", func() bool {
		_, freeAfter, err = s.Capacity()
		return err == nil && freeAfter-freeFull >= 16<<20
	})
	// The merges then succeed: keep's head and pad's are all that is left.
	waitFor(t, 60*time.Second, "the merges to succeed", func() bool { return cow.LiveLayers(s) == 2 })
	t.Logf("free %d KiB when full, %d KiB after deleting old-snap; %d failed merge passes before",
		freeFull>>10, freeAfter>>10, cow.GCFailures(s)-before)
	if err := s.WaitIdle(ctx); err != nil {
		t.Fatalf("WaitIdle after freeing space: %v", err)
	}
	if d := diffAt(readAll(t, kv), want); d != "" {
		t.Fatalf("keep after its merges: %s", d)
	}
	if err := kv.Close(); err != nil {
		t.Fatalf("Close(keep): %v", err)
	}
	s = reopenStore(t, s, cow.Options{})
	mustCheck(t, s)
	if d := diffAt(readVolume(ctx, t, s, "keep"), want); d != "" {
		t.Fatalf("keep after reopen: %s", d)
	}
}

// writeVolume creates a volume of size bytes, opens it and writes chunks
// [from, to) of 1 MiB with chunkData(seed, base+i).
func writeVolume(t *testing.T, s *cow.Store, id string, size int64, from, to int, seed int64, base int) *cow.Volume {
	t.Helper()
	if _, err := s.CreateVolume(t.Context(), cow.VolumeSpec{ID: id, Size: size}); err != nil {
		t.Fatalf("CreateVolume(%s): %v", id, err)
	}
	v, err := s.OpenVolume(t.Context(), id)
	if err != nil {
		t.Fatalf("OpenVolume(%s): %v", id, err)
	}
	writeChunks(t, v, nil, from, to, seed, base)
	if err := v.Flush(); err != nil {
		t.Fatalf("Flush(%s): %v", id, err)
	}
	return v
}

// writeChunks writes chunks [from, to) of 1 MiB to v and to img (if not nil).
func writeChunks(t *testing.T, v *cow.Volume, img []byte, from, to int, seed int64, base int) {
	t.Helper()
	const chunk = 1 << 20
	for i := from; i < to; i++ {
		p := chunkData(seed, base+i, chunk)
		if _, err := v.WriteAt(p, int64(i)*chunk); err != nil {
			t.Fatalf("WriteAt(%s, chunk %d): %v", v.ID(), i, err)
		}
		if img != nil {
			copy(img[i*chunk:], p)
		}
	}
}

// fillStore writes a new volume id until the store reports ErrNoSpace, then
// closes it (its last flush may fail for lack of space too).
func fillStore(t *testing.T, s *cow.Store, id string, seed int64) {
	t.Helper()
	const chunk = 1 << 20
	if _, err := s.CreateVolume(t.Context(), cow.VolumeSpec{ID: id, Size: 256 << 20}); err != nil {
		t.Fatalf("CreateVolume(%s): %v", id, err)
	}
	v, err := s.OpenVolume(t.Context(), id)
	if err != nil {
		t.Fatalf("OpenVolume(%s): %v", id, err)
	}
	full := false
	for i := 0; i < 256 && !full; i++ {
		_, err := v.WriteAt(chunkData(seed, 1000+i, chunk), int64(i)*chunk)
		if err == nil && i%4 == 3 {
			err = v.Flush()
		}
		if err != nil {
			if !errors.Is(err, cow.ErrNoSpace) {
				t.Fatalf("filling %s, chunk %d: %v, want ErrNoSpace", id, i, err)
			}
			full = true
		}
	}
	if !full {
		t.Fatalf("wrote 256 MiB to %s without ErrNoSpace", id)
	}
	if err := v.Close(); err != nil && !errors.Is(err, cow.ErrNoSpace) {
		t.Fatalf("Close(%s) on a full store: %v, want nil or ErrNoSpace", id, err)
	}
}

// waitFor polls cond until it holds, or fails the test after d.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
