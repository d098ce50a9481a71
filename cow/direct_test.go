package cow_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/cow"
)

// volumeIn opens a store in dir with a volume "v" of size bytes, open
// until the test ends, and returns them with the store's layers directory.
func volumeIn(t *testing.T, dir string, size int64) (*cow.Store, *cow.Volume, string) {
	t.Helper()
	s := openStore(t, dir)
	ctx := context.Background()
	if _, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: "v", Size: size}); err != nil {
		t.Fatal(err)
	}
	v, err := s.OpenVolume(ctx, "v")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	return s, v, filepath.Join(dir, "layers")
}

// headFile opens the single data file in layers.
func headFile(t *testing.T, layers string) *os.File {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(layers, "*.data"))
	if err != nil || len(files) != 1 {
		t.Fatalf("layer data files: %v, %v", files, err)
	}
	f, err := os.Open(files[0])
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// TestLargeWritesSkipCache: a write of 256 KiB or more with an aligned
// buffer goes past the page cache (O_DIRECT); one with an unaligned buffer
// is written through the page cache. Both read back.
func TestLargeWritesSkipCache(t *testing.T) {
	_, v, layers := volumeIn(t, diskTempDir(t), 4<<20)
	data := bytes.Repeat([]byte("direct.."), 1<<20/8)
	buf := alignedBuf(len(data) + 1)
	copy(buf, data)
	if _, err := v.WriteAt(buf[:len(data)], 0); err != nil {
		t.Fatal(err)
	}
	f := headFile(t, layers)
	if n := residentPages(t, f); n != 0 {
		t.Errorf("after an aligned 1 MiB write: %d pages cached, want 0", n)
	}
	got := make([]byte, len(data))
	if _, err := v.ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back of the aligned write: %v, equal=%v", err, bytes.Equal(got, data))
	}

	copy(buf[1:], data)
	if _, err := v.WriteAt(buf[1:1+len(data)], 1<<20); err != nil {
		t.Fatal(err)
	}
	if n := residentPages(t, f); n < 256 {
		t.Errorf("after an unaligned 1 MiB write: %d pages cached, want its 256", n)
	}
	if _, err := v.ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back of the unaligned write: %v, equal=%v", err, bytes.Equal(got, data))
	}
}

// TestDirectAndCachedIOAgree: direct writes and reads and cached ones of the
// same blocks, in every order, read what was written last: a direct write
// replaces cached (clean and dirty) pages of its range, and a direct read
// sees dirty cached pages. Then the store is closed and opened again.
func TestDirectAndCachedIOAgree(t *testing.T) {
	s, v, _ := volumeIn(t, t.TempDir(), 4<<20)
	want := make([]byte, 4<<20)
	big := alignedBuf(2 << 20)
	small := make([]byte, 4096)
	write := func(p []byte, off int64) {
		t.Helper()
		if _, err := v.WriteAt(p, off); err != nil {
			t.Fatalf("WriteAt(%d bytes at %d): %v", len(p), off, err)
		}
		copy(want[off:], p)
	}
	check := func(what string, p []byte, off int64) {
		t.Helper()
		if _, err := v.ReadAt(p, off); err != nil {
			t.Fatalf("%s: ReadAt(%d bytes at %d): %v", what, len(p), off, err)
		}
		if d := diffAt(p, want[off:off+int64(len(p))]); d != "" {
			t.Fatalf("%s: %s", what, d)
		}
	}
	fill := func(p []byte, c byte) []byte {
		for i := range p {
			p[i] = c + byte(i/4096)
		}
		return p
	}

	// Small writes (dirty in the cache), then a direct write over them.
	write(fill(small, 'a'), 8192)
	check("4 KiB cached", small, 8192)
	write(fill(big, 'B'), 0)
	check("4 KiB after a direct write over its cached page", small, 8192)
	check("2 MiB after a direct write", alignedBuf(2<<20), 0)

	// A dirty small write inside data written directly, then a direct read.
	write(fill(small, 'c'), 1<<20+4096)
	check("2 MiB direct read over a dirty page", alignedBuf(2<<20), 0)

	// Clean cached pages (a small read), then a direct write, then a small
	// read of them again.
	check("4 KiB into the cache", small, 3<<20)
	write(fill(big, 'D'), 2<<20)
	check("4 KiB cached before a direct write", small, 3<<20)
	check("whole volume", alignedBuf(4<<20), 0)

	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	s = reopenStore(t, s, cow.Options{})
	if got := readVolume(context.Background(), t, s, "v"); !bytes.Equal(got, want) {
		t.Fatalf("after reopening: %s", diffAt(got, want))
	}
}

// TestDirectWriteAfterSnapshot: a large write to blocks the head does not own
// yet (after a snapshot) goes the direct way too, and the snapshot keeps
// the old data.
func TestDirectWriteAfterSnapshot(t *testing.T) {
	s, v, _ := volumeIn(t, t.TempDir(), 4<<20)
	ctx := context.Background()
	old := alignedBuf(4 << 20)
	for i := range old {
		old[i] = byte(i / 4096)
	}
	if _, err := v.WriteAt(old, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateSnapshot(ctx, cow.SnapshotSpec{ID: "s", VolumeID: "v"}); err != nil {
		t.Fatal(err)
	}
	newer := alignedBuf(1 << 20)
	for i := range newer {
		newer[i] = 0xee
	}
	if _, err := v.WriteAt(newer, 1<<20); err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(old)
	copy(want[1<<20:], newer)
	if got := readAll(t, v); !bytes.Equal(got, want) {
		t.Fatalf("volume: %s", diffAt(got, want))
	}
	if got := readSnapshot(ctx, t, s, "s", "tmp"); !bytes.Equal(got, old) {
		t.Fatalf("snapshot: %s", diffAt(got, old))
	}
}

// TestWriteBehind: small writes through the page cache do not pile up
// dirty pages until a flush: past 32 MiB the layer starts their writeback.
func TestWriteBehind(t *testing.T) {
	const size = 64 << 20
	_, v, layers := volumeIn(t, diskTempDir(t), size)
	blk := bytes.Repeat([]byte{0x5a}, 4096)
	for off := int64(0); off < 48<<20; off += 4096 {
		if _, err := v.WriteAt(blk, off); err != nil {
			t.Fatal(err)
		}
	}
	f := headFile(t, layers)
	var cs unix.Cachestat_t
	deadline := time.Now().Add(10 * time.Second)
	for {
		r := unix.CachestatRange{Off: 0, Len: size}
		if err := unix.Cachestat(uint(f.Fd()), &r, &cs, 0); err != nil {
			t.Skipf("cachestat: %v", err)
		}
		// 48 MiB written: the first 32 MiB at least are under or past
		// writeback, so at most 16 MiB of pages are still dirty.
		if cs.Dirty <= 16<<20/4096 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("10 s after 48 MiB of 4 KiB writes: %d pages dirty, want at most %d", cs.Dirty, 16<<20/4096)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
