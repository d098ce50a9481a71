package cow

import (
	"bytes"
	"context"
	"testing"
)

// TestSnapshotRestoreCloneMerge walks the main paths once with fixed data.
func TestSnapshotRestoreCloneMerge(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := s.Check(); err != nil {
			t.Error(err)
		}
		s.Close()
	}()
	if _, err := s.CreateVolume(ctx, VolumeSpec{ID: "v", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	h, err := s.OpenVolume(ctx, "v")
	if err != nil {
		t.Fatal(err)
	}
	a := bytes.Repeat([]byte("a"), 10000)
	if _, err := h.WriteAt(a, 100); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot(ctx, SnapshotSpec{ID: "s1", VolumeID: "v"}); err != nil {
		t.Fatal(err)
	}
	b := bytes.Repeat([]byte("b"), 3000)
	if _, err := h.WriteAt(b, 5000); err != nil {
		t.Fatal(err)
	}
	if err := h.Discard(0, 4096); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 20000)
	if _, err := h.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 20000)
	copy(want[100:], a)
	copy(want[5000:], b)
	clear(want[:4096])
	if !bytes.Equal(got, want) {
		t.Fatalf("head view wrong")
	}
	if _, err := s.CreateVolume(ctx, VolumeSpec{ID: "r", Size: 2 << 20, SourceSnapshot: "s1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateVolume(ctx, VolumeSpec{ID: "c", Size: 1 << 20, SourceVolume: "v"}); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteSnapshot(ctx, "s1"); err != nil {
		t.Fatal(err)
	}
	if err := s.WaitIdle(ctx); err != nil {
		t.Fatal(err)
	}
	r, _ := s.OpenVolume(ctx, "r")
	want1 := make([]byte, 20000)
	copy(want1[100:], a)
	if _, err := r.ReadAt(got, 0); err != nil || !bytes.Equal(got, want1) {
		t.Fatalf("restore view wrong: %v", err)
	}
	c, _ := s.OpenVolume(ctx, "c")
	if _, err := c.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("clone view wrong: %v", err)
	}
	for _, x := range []*Volume{h, r, c} {
		if err := x.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.DeleteVolume(ctx, "r"); err != nil {
		t.Fatal(err)
	}
	if err := s.WaitIdle(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.Check(); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s, err = Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	c, _ = s.OpenVolume(ctx, "c")
	if _, err := c.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("clone view wrong after reopen: %v", err)
	}
	c.Close()
}

// TestSnapshotUsageExclusive: a snapshot's exclusive bytes are the blocks its
// layer holds that every child has overwritten, i.e. what deleting it frees.
func TestSnapshotUsageExclusive(t *testing.T) {
	ctx := context.Background()
	s, err := Open(t.TempDir(), Options{NoBackgroundMerge: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.CreateVolume(ctx, VolumeSpec{ID: "v", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	h, _ := s.OpenVolume(ctx, "v")
	defer h.Close()
	if _, err := h.WriteAt(make([]byte, 10*BlockSize), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot(ctx, SnapshotSpec{ID: "s1", VolumeID: "v"}); err != nil {
		t.Fatal(err)
	}
	if u, err := s.SnapshotUsage("s1"); err != nil || u.Allocated != 10*BlockSize || u.Exclusive != 0 {
		t.Fatalf("before overwrite: %+v %v, want Allocated 10 blocks, Exclusive 0", u, err)
	}
	if _, err := h.WriteAt(make([]byte, 4*BlockSize), 2*BlockSize); err != nil {
		t.Fatal(err)
	}
	if u, err := s.SnapshotUsage("s1"); err != nil || u.Exclusive != 4*BlockSize {
		t.Fatalf("after overwriting 4 blocks: %+v %v, want Exclusive 4 blocks", u, err)
	}
	// A restore from s1 does not overwrite anything: nothing is exclusive.
	if _, err := s.CreateVolume(ctx, VolumeSpec{ID: "r", Size: 1 << 20, SourceSnapshot: "s1"}); err != nil {
		t.Fatal(err)
	}
	if u, err := s.SnapshotUsage("s1"); err != nil || u.Exclusive != 0 {
		t.Fatalf("with a restore: %+v %v, want Exclusive 0", u, err)
	}
	if u, err := s.VolumeUsage("v"); err != nil || u.Allocated != 10*BlockSize || u.Size != 1<<20 {
		t.Fatalf("VolumeUsage: %+v %v", u, err)
	}
}
