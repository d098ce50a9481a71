package cow

import (
	"fmt"
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

// TestInitFree: at open, the free numbers are those from 1 to the highest
// the catalog used that no layer holds, lowest taken first.
func TestInitFree(t *testing.T) {
	for _, tc := range []struct {
		live []uint32
		max  uint32
		want []uint32
	}{
		{nil, 0, nil},
		{nil, 3, []uint32{1, 2, 3}},
		{[]uint32{1, 2, 3}, 3, nil},
		{[]uint32{2, 5}, 7, []uint32{1, 3, 4, 6, 7}},
		{[]uint32{1, 7}, 7, []uint32{2, 3, 4, 5, 6}},
	} {
		live := map[uint32]*layer{}
		for _, n := range tc.live {
			live[n] = nil
		}
		ns := layerNums{limit: layerNumLimit}
		ns.initFree(live, tc.max)
		var got []uint32
		for {
			n, ok := ns.take()
			if !ok {
				break
			}
			got = append(got, n)
		}
		if fmt.Sprint(got) != fmt.Sprint(tc.want) {
			t.Errorf("live %v max %d: took %v, want %v", tc.live, tc.max, got, tc.want)
		}
	}
}
