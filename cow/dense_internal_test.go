package cow

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/cow/internal/ondisk"
	"github.com/cowcsi/cowcsi/test/testutil"
)

// TestLocMapModel: random sets against a per-block model, on the heap
// alone and with an arena (leaves of more than arenaMinExts extents in
// it, moving between slot classes and back to the heap as they grow and
// shrink).
func TestLocMapModel(t *testing.T) {
	t.Run("heap", func(t *testing.T) { testLocMapModel(t, &locMap{}, 3000, 50) })
	t.Run("arena", func(t *testing.T) {
		a := testArena(t)
		m := &locMap{arena: a}
		// Enough single-block sets that leaves pass through every class.
		maxClass, backToHeap := testLocMapModel(t, m, 40000, 4000)
		if maxClass < 3 || !backToHeap {
			t.Errorf("leaves reached class %d at most (want 3 or more), went back to the heap: %v", maxClass, backToHeap)
		}
		_, inArena := m.memory()
		if got := a.bytes(); got != inArena {
			t.Errorf("arena has %d bytes in slots, the map's leaves %d", got, inArena)
		}
		m.release()
		if got := a.bytes(); got != 0 {
			t.Errorf("%d bytes of slots after release", got)
		}
	})
}

// testArena returns an arena in a test directory, closed at the end (a
// slot still in use fails the test).
func testArena(t *testing.T) *locArena {
	t.Helper()
	a := newLocArena(t.TempDir())
	if a == nil {
		t.Fatal("no arena: the test directory's filesystem has no O_TMPFILE")
	}
	t.Cleanup(func() {
		if err := a.close(); err != nil {
			t.Error(err)
		}
	})
	return a
}

// testLocMapModel runs steps random sets on m, one in bigEvery over up to
// two leaves (which leave few extents), three in four of the others of one
// block. It returns the largest arena class a leaf had, and whether a leaf
// went back from the arena to the heap.
func testLocMapModel(t *testing.T, m *locMap, steps, bigEvery int) (maxClass int, backToHeap bool) {
	rng := rand.New(rand.NewPCG(1, 2))
	const blocks = 3 * leafBlocks
	model := map[uint64]uint64{}
	maxClass = -1
	wasInArena := map[uint64]bool{}
	for step := range steps {
		start := uint64(rng.IntN(blocks))
		count := uint64(1 + rng.IntN(64))
		switch {
		case rng.IntN(bigEvery) == 0:
			count = uint64(1 + rng.IntN(2*leafBlocks))
		case step%4 != 0:
			count = 1
		}
		count = min(count, blocks-start)
		loc := uint64(rng.IntN(1 << 20))
		if rng.IntN(5) == 0 {
			loc = ondisk.LocZero
		}
		m.set(start, count, loc)
		for key, lf := range m.leaves {
			backToHeap = backToHeap || wasInArena[key] && !lf.inArena
			wasInArena[key] = lf.inArena
			if lf.inArena {
				maxClass = max(maxClass, lf.class())
				if len(lf.exts) <= arenaMinExts/2 || cap(lf.exts) != classExts(lf.class()) {
					t.Fatalf("step %d: arena leaf of %d extents in a slot of %d extents (not a class's size)", step, len(lf.exts), cap(lf.exts))
				}
			} else if m.arena != nil && len(lf.exts) > arenaMinExts {
				t.Fatalf("step %d: heap leaf of %d extents with an arena", step, len(lf.exts))
			}
		}
		for i := range count {
			if loc == ondisk.LocZero {
				model[start+i] = loc
			} else {
				model[start+i] = loc + i
			}
		}
		if step%100 != 99 {
			continue
		}
		if m.blocks != uint64(len(model)) {
			t.Fatalf("step %d: %d blocks mapped, model %d", step, m.blocks, len(model))
		}
		for b := uint64(0); b < blocks; {
			loc, n, ok := m.get(b)
			want, wok := model[b]
			if ok != wok || ok && loc != want || n == 0 {
				t.Fatalf("step %d block %d: got %d %v (n %d), want %d %v", step, b, loc, ok, n, want, wok)
			}
			// Every block of the run get reports continues it.
			for i := uint64(1); i < n; i++ {
				w, wok := model[b+i]
				if wok != ok || ok && (loc == ondisk.LocZero && w != loc || loc != ondisk.LocZero && w != loc+i) {
					t.Fatalf("step %d: block %d in the run of %d (loc %d, n %d) has %d %v", step, b+i, b, loc, n, w, wok)
				}
			}
			b += n
		}
	}
	return maxClass, backToHeap
}

// fiemapExtents returns how many extents the filesystem maps for f
// (FS_IOC_FIEMAP with no room for them: the kernel only counts).
func fiemapExtents(t *testing.T, f *os.File) uint32 {
	t.Helper()
	var fm struct {
		start, length        uint64
		flags, mapped, count uint32
		reserved             uint32
	}
	fm.length = ^uint64(0)
	fm.flags = 1 // FIEMAP_FLAG_SYNC
	const fsIocFiemap = 0xC020660B
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), fsIocFiemap, uintptr(unsafe.Pointer(&fm))); errno != 0 {
		t.Skipf("FIEMAP: %v", errno)
	}
	return fm.mapped
}

// TestDenseLayout: random 4 KiB writes after a snapshot (the first write of
// each block to the new head) land back to back in the head's data file:
// the file takes about the space written, in a few extents; the data reads
// back the same, also after reopening the store.
func TestDenseLayout(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil || st.Type == unix.TMPFS_MAGIC {
		t.Skip("needs a disk filesystem for FIEMAP")
	}
	const size = 64 << 20
	s, h := storeWithVolume(t, dir, size)
	defer func() { s.Close() }()
	want := make([]byte, size)
	fill := bytes.Repeat([]byte("base...."), 1<<20/8)
	for off := 0; off < size; off += len(fill) {
		if _, err := h.WriteAt(fill, int64(off)); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], fill)
	}
	if _, err := s.CreateSnapshot(ctx, SnapshotSpec{ID: "s", VolumeID: "v"}); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(3, 4))
	const writes = 2048
	seen := map[int]bool{}
	for len(seen) < writes {
		b := rng.IntN(size / BlockSize)
		seen[b] = true
		blk := bytes.Repeat([]byte{byte(b), byte(b >> 8), 'n', 'e', 'w', '.', '.', '.'}, BlockSize/8)
		if _, err := h.WriteAt(blk, int64(b)*BlockSize); err != nil {
			t.Fatal(err)
		}
		copy(want[b*BlockSize:], blk)
	}
	if err := h.Flush(); err != nil {
		t.Fatal(err)
	}
	head := h.v.head.Load()
	var fst unix.Stat_t
	if err := unix.Fstat(int(head.data.Fd()), &fst); err != nil {
		t.Fatal(err)
	}
	exts := fiemapExtents(t, head.data)
	used := fst.Blocks * 512
	t.Logf("head data file %d bytes in %d extents for %d blocks written", used, exts, writes)
	if used < writes*BlockSize || used > writes*BlockSize*5/4 {
		t.Errorf("head data file takes %d bytes for %d bytes written", used, writes*BlockSize)
	}
	if exts > 64 {
		t.Errorf("head: %d extents for %d blocks appended", exts, writes)
	}
	got := make([]byte, size)
	if _, err := h.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read back: %v, equal %v", err, bytes.Equal(got, want))
	}
	s = reopenChecked(t, h, s, dir)
	var err error
	if h, err = s.OpenVolume(ctx, "v"); err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	clear(got)
	if _, err := h.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read back after reopen: %v, equal %v", err, bytes.Equal(got, want))
	}
}

// TestDenseReclaim: file blocks a dense layer wrote but never recorded (a
// crash before the flush, a stopped merge) are freed when the store opens:
// holes between recorded blocks, and the file ends after the last one.
func TestDenseReclaim(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s, h := storeWithVolume(t, dir, 16<<20)
	defer func() { s.Close() }()
	data := bytes.Repeat([]byte("kept...."), 64*BlockSize/8)
	junk := bytes.Repeat([]byte("junk...."), 32*BlockSize/8)
	head := h.v.head.Load()
	// Recorded, unrecorded, recorded, unrecorded at the end.
	if _, err := h.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	for _, n := range []int{32, 0, 16} {
		if n == 0 {
			if _, err := h.WriteAt(data, 1<<20); err != nil {
				t.Fatal(err)
			}
			continue
		}
		loc, err := head.alloc(uint64(n))
		if err != nil {
			t.Fatal(err)
		}
		if err := head.writeData(junk[:n*BlockSize], int64(loc)<<blockShift); err != nil {
			t.Fatal(err)
		}
	}
	s = reopenChecked(t, h, s, dir)
	l := s.vols["v"].head.Load()
	var fst unix.Stat_t
	if err := unix.Fstat(int(l.data.Fd()), &fst); err != nil {
		t.Fatal(err)
	}
	// 64 + 32 unrecorded + 64 blocks: the file ends after the second 64.
	if want := int64(64+32+64) * BlockSize; fst.Size != want || l.next.Load() != 64+32+64 {
		t.Errorf("data file size %d, next block %d; want %d", fst.Size, l.next.Load(), want)
	}
	if want := int64(128) * BlockSize; fst.Blocks*512 != want {
		t.Errorf("data file takes %d bytes, want %d (the unrecorded blocks freed)", fst.Blocks*512, want)
	}
	h, err := s.OpenVolume(ctx, "v")
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	got := make([]byte, len(data))
	for _, off := range []int64{0, 1 << 20} {
		if _, err := h.ReadAt(got, off); err != nil || !bytes.Equal(got, data) {
			t.Fatalf("read at %d: %v, equal %v", off, err, bytes.Equal(got, data))
		}
	}
}

// storeWithVolume opens a store in dir with a volume "v" of size bytes,
// and opens the volume. The caller closes the store.
func storeWithVolume(t *testing.T, dir string, size int64) (*Store, *Volume) {
	t.Helper()
	ctx := context.Background()
	s, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateVolume(ctx, VolumeSpec{ID: "v", Size: size}); err != nil {
		s.Close()
		t.Fatal(err)
	}
	h, err := s.OpenVolume(ctx, "v")
	if err != nil {
		s.Close()
		t.Fatal(err)
	}
	return s, h
}

// reopenChecked closes h and s, opens the store in dir again and checks it.
func reopenChecked(t *testing.T, h *Volume, s *Store, dir string) *Store {
	t.Helper()
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Check(); err != nil {
		t.Fatal(err)
	}
	return s
}

// TestDenseFileLimit: a dense layer's file blocks stop below maxFileBlocks
// (locExt keeps 32 bits of them): alloc says ErrNoSpace past it, and the
// last block below it is a location like any other.
func TestDenseFileLimit(t *testing.T) {
	var m locMap
	m.set(leafBlocks-1, 2, maxFileBlocks-2) // across two leaves
	for b, want := range map[uint64]uint64{leafBlocks - 1: maxFileBlocks - 2, leafBlocks: maxFileBlocks - 1} {
		if loc, _, ok := m.get(b); !ok || loc != want {
			t.Errorf("block %d: location %d, %v; want %d", b, loc, ok, want)
		}
	}
	if end := m.end(); end != maxFileBlocks {
		t.Errorf("end %d, want %d", end, uint64(maxFileBlocks))
	}
	m.set(5, 1, ondisk.LocZero)
	if loc, _, ok := m.get(5); !ok || loc != ondisk.LocZero {
		t.Errorf("zero block: location %d, %v", loc, ok)
	}
	// What replay and Check accept: the last block below the limit, zeros;
	// not a block at it, a run across it, nor one whose end wraps around.
	for _, c := range []struct {
		r    ondisk.Range
		fits bool
	}{
		{ondisk.Range{Start: 0, Count: 1, Loc: maxFileBlocks - 1}, true},
		{ondisk.Range{Start: 0, Count: 1 << 40, Loc: ondisk.LocZero}, true},
		{ondisk.Range{Start: 0, Count: 1, Loc: maxFileBlocks}, false},
		{ondisk.Range{Start: 0, Count: 2, Loc: maxFileBlocks - 1}, false},
		{ondisk.Range{Start: 0, Count: 4, Loc: ondisk.LocZero - 2}, false},
	} {
		if got := fitsLocs(c.r); got != c.fits {
			t.Errorf("fitsLocs(%+v) = %v, want %v", c.r, got, c.fits)
		}
	}

	s, h := storeWithVolume(t, t.TempDir(), 1<<20)
	defer s.Close()
	defer h.Close()
	head := h.v.head.Load()
	// A write creates the head's files, which alloc grows.
	if _, err := h.WriteAt(make([]byte, BlockSize), 0); err != nil {
		t.Fatal(err)
	}
	head.next.Store(maxFileBlocks - 1)
	if _, err := head.alloc(2); !errors.Is(err, ErrNoSpace) {
		t.Errorf("alloc past the limit: %v, want ErrNoSpace", err)
	}
}

// TestArenaStore: random first writes after a snapshot put the head's
// leaves in the store's arena; the data reads back the same after the
// store reopens (the extents rebuilt from the journal into a new arena),
// after the snapshot is deleted (its layer merged into the head, whose
// leaves move), and every slot is given back when the layers go (Close
// then fails if one is not).
func TestArenaStore(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	const size = 64 << 20
	s, h := storeWithVolume(t, dir, size)
	defer func() { s.Close() }()
	if s.arena == nil {
		t.Fatal("no arena: the test directory's filesystem has no O_TMPFILE")
	}
	want := make([]byte, size)
	rng := rand.New(rand.NewPCG(7, 8))
	write := func(n int, tag byte) {
		t.Helper()
		for range n {
			b := rng.IntN(size / BlockSize)
			blk := bytes.Repeat([]byte{byte(b), byte(b >> 8), tag, '.'}, BlockSize/4)
			if _, err := h.WriteAt(blk, int64(b)*BlockSize); err != nil {
				t.Fatal(err)
			}
			copy(want[b*BlockSize:], blk)
		}
		if err := h.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	check := func(what string) {
		t.Helper()
		got := make([]byte, size)
		if _, err := h.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s: read %v, equal %v", what, err, bytes.Equal(got, want))
		}
	}
	write(3000, 'a')
	if _, err := s.CreateSnapshot(ctx, SnapshotSpec{ID: "s", VolumeID: "v"}); err != nil {
		t.Fatal(err)
	}
	write(3000, 'b')
	inArena := s.arena.bytes()
	if inArena == 0 {
		t.Fatal("no leaf in the arena after 3000 random 4 KiB writes to two leaves")
	}
	check("after writes")

	s = reopenChecked(t, h, s, dir)
	if got := s.arena.bytes(); got != inArena {
		t.Errorf("after reopen %d bytes of slots, before %d", got, inArena)
	}
	var err error
	if h, err = s.OpenVolume(ctx, "v"); err != nil {
		t.Fatal(err)
	}
	check("after reopen")

	if err := s.DeleteSnapshot(ctx, "s"); err != nil {
		t.Fatal(err)
	}
	if err := s.WaitIdle(ctx); err != nil {
		t.Fatal(err)
	}
	check("after the merge")
	if err := s.Check(); err != nil {
		t.Fatal(err)
	}
	var held int64
	for _, l := range s.byNum {
		_, n := l.locs.memory()
		held += n
	}
	if got := s.arena.bytes(); got != held {
		t.Errorf("arena has %d bytes of slots, live layers hold %d", got, held)
	}

	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteVolume(ctx, "v"); err != nil {
		t.Fatal(err)
	}
	if err := s.WaitIdle(ctx); err != nil {
		t.Fatal(err)
	}
	if got := s.arena.bytes(); got != 0 {
		t.Errorf("%d bytes of slots left with no layer", got)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestArenaFull: where the arena cannot reserve a segment (a full disk),
// leaves stay on the heap, and the map works the same.
func TestArenaFull(t *testing.T) {
	a := testArena(t)
	a.broken = true // as after a failed fallocate
	m := &locMap{arena: a}
	var model locMap
	rng := rand.New(rand.NewPCG(9, 10))
	for i, b := range rng.Perm(leafBlocks) {
		m.set(uint64(b), 1, uint64(i))
		model.set(uint64(b), 1, uint64(i))
	}
	if heap, arena := m.memory(); arena != 0 || heap == 0 || a.bytes() != 0 {
		t.Errorf("heap %d, arena %d bytes, arena's own count %d", heap, arena, a.bytes())
	}
	for b := uint64(0); b < leafBlocks; b++ {
		l1, n1, ok1 := m.get(b)
		l2, n2, ok2 := model.get(b)
		if l1 != l2 || n1 != n2 || ok1 != ok2 {
			t.Fatalf("block %d: %d %d %v, want %d %d %v", b, l1, n1, ok1, l2, n2, ok2)
		}
	}
}

// TestArenaPagedOut: the arena's pages are the kernel's to reclaim. After
// they are written back (msync) and paged out (MADV_PAGEOUT, what reclaim
// under pressure does), none is resident, and the locations fault back in
// from the file unchanged.
func TestArenaPagedOut(t *testing.T) {
	dir := t.TempDir()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil || st.Type == unix.TMPFS_MAGIC {
		t.Skip("needs a disk filesystem: tmpfs pages go to swap, not to the file")
	}
	a := testArena(t)
	m := &locMap{arena: a}
	var model locMap
	const blocks = 4 * leafBlocks
	for i, b := range rand.New(rand.NewPCG(11, 12)).Perm(blocks) {
		m.set(uint64(b), 1, uint64(i))
		model.set(uint64(b), 1, uint64(i))
	}
	if _, inArena := m.memory(); inArena < blocks*int64(unsafe.Sizeof(locExt{})) {
		t.Fatalf("%d bytes in the arena for %d one-block extents", inArena, blocks)
	}
	resident := func() (n int) {
		for _, seg := range a.segs {
			vec := make([]byte, (len(seg)+os.Getpagesize()-1)/os.Getpagesize())
			if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&seg[0])), uintptr(len(seg)), uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
				t.Fatal(errno)
			}
			for _, v := range vec {
				n += int(v & 1)
			}
		}
		return n
	}
	before := resident()
	for _, seg := range a.segs {
		if err := unix.Msync(seg, unix.MS_SYNC); err != nil {
			t.Fatal(err)
		}
		if err := unix.Madvise(seg, unix.MADV_PAGEOUT); err != nil {
			t.Fatal(err)
		}
	}
	after := resident()
	t.Logf("resident arena pages: %d, after writeback and pageout %d", before, after)
	if before == 0 || after > before/10 {
		t.Errorf("resident arena pages %d before, %d after pageout", before, after)
	}
	for b := uint64(0); b < blocks; b++ {
		l1, n1, ok1 := m.get(b)
		l2, n2, ok2 := model.get(b)
		if l1 != l2 || n1 != n2 || ok1 != ok2 {
			t.Fatalf("block %d after pageout: %d %d %v, want %d %d %v", b, l1, n1, ok1, l2, n2, ok2)
		}
	}
	m.release()
}

// TestArenaUnderMemoryLimit: a process whose memory cgroup allows 64 MiB
// holds 256 MiB of location extents in an arena and reads every one back:
// the kernel writes the arena's pages back to its file and drops them to
// stay under the limit, as it cannot do for heap memory without swap. The
// holding process is this test binary again (arenaChildEnv), moved into a
// cgroup made for it before it starts.
func TestArenaUnderMemoryLimit(t *testing.T) {
	if dir := os.Getenv(arenaChildEnv); dir != "" {
		arenaChild(t, dir)
		return
	}
	testutil.RequireRoot(t)
	dir := t.TempDir()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil || st.Type == unix.TMPFS_MAGIC {
		t.Skip("needs a disk filesystem: tmpfs pages go to swap, not to the file")
	}
	cg := newMemCgroup(t, 64<<20)
	cmd := exec.Command(os.Args[0], "-test.run=^TestArenaUnderMemoryLimit$", "-test.v")
	cmd.Env = append(os.Environ(), arenaChildEnv+"="+dir)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	if err := cg.add(cmd.Process.Pid); err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatal(err)
	}
	stdin.Close() // the child starts on EOF
	err = cmd.Wait()
	t.Logf("child:\n%s", out.String())
	t.Logf("cgroup: %s", cg.summary())
	if err != nil {
		t.Fatalf("child holding 256 MiB of arena under a 64 MiB limit: %v (an OOM kill shows as signal: killed)", err)
	}
	if !strings.Contains(out.String(), "arena child: ok") {
		t.Fatal("child did not report its check")
	}
}

const arenaChildEnv = "COWCSI_ARENA_CHILD_DIR"

// arenaChild fills 256 MiB of arena slots (whole-leaf ones, 64 KiB) with
// extents named after their slot, then checks every one.
func arenaChild(t *testing.T, dir string) {
	if _, err := io.Copy(io.Discard, os.Stdin); err != nil { // wait for the cgroup
		t.Fatal(err)
	}
	a := newLocArena(dir)
	if a == nil {
		t.Fatal("no arena")
	}
	const class = arenaClasses - 1
	n := 256 << 20 / (classExts(class) * int(unsafe.Sizeof(locExt{})))
	slots := make([]arenaSlot, n)
	for i := range n {
		s, exts, ok := a.alloc(class)
		if !ok {
			t.Fatalf("slot %d: no space", i)
		}
		for k := range cap(exts) {
			exts = append(exts, locExt{start: uint16(k), count: 1, loc: uint32(i)})
		}
		slots[i] = s
	}
	for i, s := range slots {
		exts := a.exts(s, class)[:classExts(class)]
		for k, e := range exts {
			if e.start != uint16(k) || e.loc != uint32(i) {
				t.Fatalf("slot %d extent %d: %+v", i, k, e)
			}
		}
		a.release(s, class)
	}
	if err := a.close(); err != nil {
		t.Fatal(err)
	}
	var rss string
	if b, err := os.ReadFile("/proc/self/status"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(line, "VmHWM") || strings.HasPrefix(line, "RssFile") || strings.HasPrefix(line, "RssAnon") {
				rss += " " + strings.Join(strings.Fields(line), " ")
			}
		}
	}
	fmt.Printf("arena child: ok, %d slots of 64 KiB checked;%s\n", n, rss)
}

// TestIdentityJournalRefused: a store with a layer whose journal is of
// version 1 (the identity layout of pre-release builds) does not open:
// Open fails with ErrIdentityLayout, and the layer's files are kept. The
// journal is written by hand here, as that build wrote it: a header
// (magic "CWM1", version 1, layer) and records (magic "CWR1", start,
// count), each CRC32C-checksummed.
func TestIdentityJournalRefused(t *testing.T) {
	for _, records := range []int{0, 1} {
		t.Run(fmt.Sprint("records=", records), func(t *testing.T) {
			dir := t.TempDir()
			s, h := storeWithVolume(t, dir, 1<<20)
			if _, err := h.WriteAt(bytes.Repeat([]byte{1}, BlockSize), 0); err != nil {
				t.Fatal(err)
			}
			num := h.v.head.Load().num
			if err := h.Close(); err != nil {
				t.Fatal(err)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			le := binary.LittleEndian
			img := make([]byte, 4096)
			le.PutUint32(img[0:], 0x314d5743) // "CWM1"
			le.PutUint16(img[4:], 1)
			le.PutUint32(img[8:], num)
			le.PutUint32(img[28:], ondisk.Checksum(img[:28]))
			for i := range records {
				rec := img[ondisk.JournalHeaderSize*(i+1):]
				le.PutUint32(rec[0:], 0x31525743) // "CWR1"
				le.PutUint64(rec[8:], 0)
				le.PutUint64(rec[16:], 1)
				le.PutUint32(rec[24:], ondisk.Checksum(rec[:24]))
			}
			dp, jp := layerPaths(filepath.Join(dir, layersDir), num)
			if err := os.WriteFile(jp, img, 0o600); err != nil {
				t.Fatal(err)
			}
			s, err := Open(dir, Options{})
			if err == nil {
				s.Close()
				t.Fatal("store with a version 1 journal opened")
			}
			if !errors.Is(err, ErrIdentityLayout) || !strings.Contains(err.Error(), "identity-layout layer format of pre-release builds is no longer supported") {
				t.Fatalf("got %v, want ErrIdentityLayout", err)
			}
			for _, p := range []string{dp, jp} {
				if _, err := os.Stat(p); err != nil {
					t.Errorf("layer file after the refused open: %v", err)
				}
			}
		})
	}
}
