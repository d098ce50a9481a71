package cow_test

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/cowcsi/cowcsi/cow"
)

// Flags for the randomized tests. The defaults keep every test well under a
// minute with -race on two cores; the flags replay a failure or run longer.
var (
	flagSeed    = flag.Int64("cow.seed", 0, "seed for the randomized cow tests (0: time-based)")
	flagSteps   = flag.Int("cow.steps", 0, "steps of the randomized model test (0: default)")
	flagLong    = flag.Bool("cow.long", false, "run the randomized cow tests ten times longer")
	flagCrashes = flag.Int("cow.crashes", 0, "kill -9 rounds of the crash test (0: default)")
)

// testSeed returns the seed of a randomized test and logs how to replay it.
func testSeed(t testing.TB) int64 {
	t.Helper()
	seed := *flagSeed
	if seed == 0 {
		seed = time.Now().UnixNano()
	}
	t.Logf("seed %d (replay: go test -race -count=1 ./cow -run '^%s$' -cow.seed=%d)", seed, t.Name(), seed)
	return seed
}

// scaled returns n, or ten times n with -cow.long.
func scaled(n int) int {
	if *flagLong {
		return 10 * n
	}
	return n
}

// fastTempDir returns a temporary directory on tmpfs (/dev/shm) when there
// is one, else t.TempDir(). Kill -9 tests run there: page cache survives a
// killed process, and without real fsyncs a workload does many more
// operations between two kills, so the kills land in more narrow windows.
func fastTempDir(t testing.TB) string {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs("/dev/shm", &st); err != nil || st.Type != 0x01021994 { // TMPFS_MAGIC
		return t.TempDir()
	}
	dir, err := os.MkdirTemp("/dev/shm", "cowtest-")
	if err != nil {
		return t.TempDir()
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// openStore opens the store in dir with default options; see openStoreOpts.
func openStore(t testing.TB, dir string) *cow.Store {
	t.Helper()
	return openStoreOpts(t, dir, cow.Options{})
}

// openStoreOpts opens a store and registers a cleanup that runs the engine's
// consistency checker and then closes the store. A store the test has closed
// itself (see reopenStore) is skipped by the cleanup.
func openStoreOpts(t testing.TB, dir string, opts cow.Options) *cow.Store {
	t.Helper()
	s, err := cow.Open(dir, opts)
	if err != nil {
		t.Fatalf("Open(%q): %v", dir, err)
	}
	t.Cleanup(func() {
		err := s.Check()
		if errors.Is(err, cow.ErrClosed) {
			return
		}
		if err != nil {
			t.Errorf("Check of store %s at cleanup: %v", dir, err)
		}
		if err := s.Close(); err != nil && !errors.Is(err, cow.ErrClosed) {
			t.Errorf("Close of store %s at cleanup: %v", dir, err)
		}
	})
	return s
}

// reopenStore checks and closes s, then opens its directory again.
func reopenStore(t testing.TB, s *cow.Store, opts cow.Options) *cow.Store {
	t.Helper()
	dir := s.Dir()
	if err := s.Check(); err != nil {
		t.Fatalf("Check before close: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	return openStoreOpts(t, dir, opts)
}

// mustCheck fails the test if the store's consistency checker reports anything.
func mustCheck(t testing.TB, s *cow.Store) {
	t.Helper()
	if err := s.Check(); err != nil {
		t.Fatalf("Check: %v (corrupt=%v)", err, errors.Is(err, cow.ErrCorrupt))
	}
}

// roundUp rounds n up to a multiple of cow.BlockSize.
func roundUp(n int64) int64 {
	return (n + cow.BlockSize - 1) / cow.BlockSize * cow.BlockSize
}

// readAll reads the whole volume through its handle.
func readAll(t testing.TB, v *cow.Volume) []byte {
	t.Helper()
	buf := make([]byte, v.Size())
	n, err := v.ReadAt(buf, 0)
	if err != nil && !(err == io.EOF && n == len(buf)) {
		t.Fatalf("ReadAt(volume %s, whole %d bytes): n=%d err=%v", v.ID(), len(buf), n, err)
	}
	return buf
}

// readVolume opens volume id, reads it whole and closes it again.
func readVolume(ctx context.Context, t testing.TB, s *cow.Store, id string) []byte {
	t.Helper()
	v, err := s.OpenVolume(ctx, id)
	if err != nil {
		t.Fatalf("OpenVolume(%s): %v", id, err)
	}
	defer func() {
		if err := v.Close(); err != nil {
			t.Errorf("Close(%s): %v", id, err)
		}
	}()
	return readAll(t, v)
}

// readSnapshot returns the contents of snapshot id by restoring it into a
// temporary volume (the API has no direct snapshot reader), which it deletes.
func readSnapshot(ctx context.Context, t testing.TB, s *cow.Store, id, tmpID string) []byte {
	t.Helper()
	info, err := s.GetSnapshot(id)
	if err != nil {
		t.Fatalf("GetSnapshot(%s): %v", id, err)
	}
	if _, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: tmpID, Size: info.Size, SourceSnapshot: id}); err != nil {
		t.Fatalf("restore snapshot %s into %s: %v", id, tmpID, err)
	}
	data := readVolume(ctx, t, s, tmpID)
	if err := s.DeleteVolume(ctx, tmpID); err != nil {
		t.Fatalf("DeleteVolume(%s): %v", tmpID, err)
	}
	return data
}

// diffAt describes the first difference between got and want, or "" if equal.
func diffAt(got, want []byte) string {
	if bytes.Equal(got, want) {
		return ""
	}
	if len(got) != len(want) {
		return fmt.Sprintf("length %d, want %d", len(got), len(want))
	}
	for i := range got {
		if got[i] != want[i] {
			end := i
			for end < len(got) && got[end] != want[end] {
				end++
			}
			return fmt.Sprintf("first difference at byte %d (block %d, offset %d in block): %d differing bytes from there; got %x.. want %x..",
				i, i/cow.BlockSize, i%cow.BlockSize, end-i, got[i:min(i+8, len(got))], want[i:min(i+8, len(want))])
		}
	}
	return ""
}

// listTree returns every path under root (relative to it) except those under
// the skip directories, with a one-letter kind, so tests can assert that
// nothing was created outside a store directory.
func listTree(t testing.TB, root string, skip ...string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		for _, s := range skip {
			if p == s {
				return filepath.SkipDir
			}
		}
		rel, _ := filepath.Rel(root, p)
		kind := "f"
		if d.IsDir() {
			kind = "d"
		}
		out[rel] = kind
		return nil
	})
	if err != nil {
		t.Fatalf("walk %s: %v", root, err)
	}
	return out
}

// byteRuns returns the maximal runs of offsets i in [0, n) where pred(i)
// holds, visiting only the blocks that skip(block offset) does not rule out.
func byteRuns(n int, skip func(off, end int) bool, pred func(i int) bool) []cow.Extent {
	var runs []cow.Extent
	for off := 0; off < n; off += cow.BlockSize {
		end := min(off+cow.BlockSize, n)
		if skip(off, end) {
			continue
		}
		for i := off; i < end; i++ {
			if !pred(i) {
				continue
			}
			if k := len(runs) - 1; k >= 0 && runs[k].Offset+runs[k].Length == int64(i) {
				runs[k].Length++
			} else {
				runs = append(runs, cow.Extent{Offset: int64(i), Length: 1})
			}
		}
	}
	return runs
}

// diffRuns returns the byte ranges where a and b differ, the shorter one read
// as if padded with zeros.
func diffRuns(a, b []byte) []cow.Extent {
	n := max(len(a), len(b))
	at := func(p []byte, i int) byte {
		if i < len(p) {
			return p[i]
		}
		return 0
	}
	zero := make([]byte, cow.BlockSize)
	slice := func(p []byte, off, end int) []byte {
		if end <= len(p) {
			return p[off:end]
		}
		if off >= len(p) {
			return zero[:end-off]
		}
		return append(bytes.Clone(p[off:]), zero[:end-len(p)]...)
	}
	return byteRuns(n,
		func(off, end int) bool { return bytes.Equal(slice(a, off, end), slice(b, off, end)) },
		func(i int) bool { return at(a, i) != at(b, i) })
}

// nonzeroRuns returns the byte ranges of p that are not zero.
func nonzeroRuns(p []byte) []cow.Extent {
	return diffRuns(p, nil)
}

// uncovered returns the first offset of runs that no extent covers, or -1.
func uncovered(exts, runs []cow.Extent) int64 {
	sorted := slices.Clone(exts)
	slices.SortFunc(sorted, func(a, b cow.Extent) int { return cmp.Compare(a.Offset, b.Offset) })
	var merged []cow.Extent // coalesced, so each run needs a single extent
	for _, e := range sorted {
		if k := len(merged) - 1; k >= 0 && e.Offset <= merged[k].Offset+merged[k].Length {
			merged[k].Length = max(merged[k].Length, e.Offset+e.Length-merged[k].Offset)
		} else if e.Length > 0 {
			merged = append(merged, e)
		}
	}
	for _, r := range runs {
		i, _ := slices.BinarySearchFunc(merged, r.Offset, func(e cow.Extent, off int64) int {
			return cmp.Compare(e.Offset+e.Length, off+1)
		})
		// merged[i] is the first extent ending after r.Offset.
		if i == len(merged) || merged[i].Offset > r.Offset {
			return r.Offset
		}
		if end := merged[i].Offset + merged[i].Length; end < r.Offset+r.Length {
			return end
		}
	}
	return -1
}

// TestCoverageHelpers pins the helpers the extent checks rely on.
func TestCoverageHelpers(t *testing.T) {
	a := make([]byte, 3*cow.BlockSize)
	b := bytes.Clone(a)
	b[10], b[11], b[cow.BlockSize+5] = 1, 1, 1
	long := append(bytes.Clone(b), 0, 7)
	if got, want := diffRuns(a, b), []cow.Extent{{10, 2}, {cow.BlockSize + 5, 1}}; !slices.Equal(got, want) {
		t.Errorf("diffRuns = %v, want %v", got, want)
	}
	if got, want := diffRuns(a, long), []cow.Extent{{10, 2}, {cow.BlockSize + 5, 1}, {3*cow.BlockSize + 1, 1}}; !slices.Equal(got, want) {
		t.Errorf("diffRuns(padded) = %v, want %v", got, want)
	}
	runs := nonzeroRuns(b)
	for _, tc := range []struct {
		exts []cow.Extent
		want int64
	}{
		{nil, 10},
		{[]cow.Extent{{0, 2 * cow.BlockSize}}, -1},
		{[]cow.Extent{{cow.BlockSize, cow.BlockSize}, {0, 11}}, 11},
		{[]cow.Extent{{cow.BlockSize, cow.BlockSize}, {0, 6}, {6, 6}}, -1},
		{[]cow.Extent{{0, cow.BlockSize}}, cow.BlockSize + 5},
		{[]cow.Extent{{11, 100}, {0, cow.BlockSize}}, cow.BlockSize + 5},
	} {
		if got := uncovered(tc.exts, runs); got != tc.want {
			t.Errorf("uncovered(%v) = %d, want %d", tc.exts, got, tc.want)
		}
	}
}
