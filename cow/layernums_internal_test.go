package cow

import (
	"os"
	"path/filepath"
	"testing"
)

// TestRetiredNumberWaitsForItsFiles: the number of a removed layer whose
// files cannot be removed is not given to a new layer; once they are gone
// (and the directory synced), it is.
func TestRetiredNumberWaitsForItsFiles(t *testing.T) {
	ctx := t.Context()
	s, err := Open(t.TempDir(), Options{NoBackgroundMerge: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	headOf := func(id string) uint32 {
		t.Helper()
		s.topo.Lock()
		defer s.topo.Unlock()
		return s.vols[id].head.Load().num
	}
	if _, err := s.CreateVolume(ctx, VolumeSpec{ID: "a", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	h, err := s.OpenVolume(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.WriteAt(make([]byte, BlockSize), 0); err != nil {
		t.Fatal(err)
	}
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	old := headOf("a")
	if err := s.DeleteVolume(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	// A file of the old layer that cannot be removed: its journal's name
	// taken by a directory that is not empty.
	_, journal := layerPaths(s.layerFS, old)
	if err := os.Remove(journal); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(journal, "busy"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := s.WaitIdle(ctx); err == nil {
		t.Fatalf("WaitIdle with a layer file that cannot be removed: no error")
	}
	if _, err := s.CreateVolume(ctx, VolumeSpec{ID: "b", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	if n := headOf("b"); n == old {
		t.Fatalf("layer number %d reused while a file of its old layer is still there", old)
	}
	if err := os.RemoveAll(journal); err != nil {
		t.Fatal(err)
	}
	if err := s.WaitIdle(ctx); err != nil {
		t.Fatalf("WaitIdle: %v", err)
	}
	if _, err := s.CreateVolume(ctx, VolumeSpec{ID: "c", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	if n := headOf("c"); n != old {
		t.Fatalf("new layer got number %d, want the freed %d", n, old)
	}
	if err := s.Check(); err != nil {
		t.Fatalf("Check: %v", err)
	}
}
