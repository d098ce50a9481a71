package cow_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/cow"
)

// TestReadAtNoWait: data only on disk makes ReadAtNoWait fail with EAGAIN
// (the FUSE ring then reads it off its thread); once cached, and for blocks
// nobody wrote, it reads like ReadAt.
func TestReadAtNoWait(t *testing.T) {
	dir := diskTempDir(t)
	data := bytes.Repeat([]byte("nowait!!"), 64<<10/8)
	v := writtenVolume(t, dir, data, 64<<10)

	got := make([]byte, len(data))
	if _, err := v.ReadAtNoWait(got, 512<<10); err != nil || !bytes.Equal(got, make([]byte, len(got))) {
		t.Fatalf("ReadAtNoWait of blocks never written: %v, zeros=%v", err, bytes.Equal(got, make([]byte, len(got))))
	}

	// Drop the layer file's clean pages: the data is on disk only.
	files, err := filepath.Glob(filepath.Join(dir, "layers", "*.data"))
	if err != nil || len(files) == 0 {
		t.Fatalf("layer data files: %v, %v", files, err)
	}
	// With the pages gone, RWF_NOWAIT still starts their read, and on a
	// fast disk it may complete before the kernel looks again: then the
	// read succeeds, which is fine as long as the data is right. EAGAIN
	// must come in some of the tries: here most runs saw it at the first,
	// but in about 1 of 100 runs none of 50 tries did.
	sawEAGAIN := false
	for try := 0; try < 50 && !sawEAGAIN; try++ {
		for _, p := range files {
			dropCache(t, p)
		}
		clear(got)
		_, err := v.ReadAtNoWait(got, 64<<10)
		switch {
		case errors.Is(err, syscall.EAGAIN):
			sawEAGAIN = true
		case err != nil:
			t.Fatalf("ReadAtNoWait of data on disk only: %v, want EAGAIN or the data", err)
		case !bytes.Equal(got, data):
			t.Fatal("ReadAtNoWait of data on disk only returned other data")
		}
	}
	if !sawEAGAIN {
		// Seen here in about 1 of 100 runs: every try's read from disk
		// completed before the kernel checked (the data was right).
		t.Skip("the disk answered every RWF_NOWAIT read in time (50 tries): EAGAIN not exercised")
	}
	if _, err := v.ReadAt(got, 64<<10); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("ReadAt: %v, equal=%v", err, bytes.Equal(got, data))
	}
	clear(got)
	if _, err := v.ReadAtNoWait(got, 64<<10); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("ReadAtNoWait once cached: %v, equal=%v", err, bytes.Equal(got, data))
	}
}

// TestReadsLeaveAtime: reading a volume does not write the layer files'
// inodes (O_NOATIME). Under relatime a read updates an atime older than
// the mtime, which is what the test sets up.
func TestReadsLeaveAtime(t *testing.T) {
	dir := t.TempDir()
	v := writtenVolume(t, dir, bytes.Repeat([]byte("atime..."), 8192/8), 0)
	files, err := filepath.Glob(filepath.Join(dir, "layers", "*.data"))
	if err != nil || len(files) == 0 {
		t.Fatalf("layer data files: %v, %v", files, err)
	}
	old := time.Now().Add(-48 * time.Hour).Truncate(time.Second)
	for _, p := range files {
		if err := os.Chtimes(p, old, time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	buf := make([]byte, 8192)
	if _, err := v.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	for _, p := range files {
		var st unix.Stat_t
		if err := unix.Stat(p, &st); err != nil {
			t.Fatal(err)
		}
		if got := time.Unix(st.Atim.Unix()); !got.Equal(old) {
			t.Errorf("%s: atime %v after a read, want it left at %v", filepath.Base(p), got, old)
		}
	}
}

// diskTempDir is t.TempDir, skipping the test where that is tmpfs: its
// file data lives in the page cache, so what the test checks about the
// cache (reads that wait, writes or reads that leave nothing cached,
// writeback) has no meaning there.
func diskTempDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	if st.Type == unix.TMPFS_MAGIC {
		t.Skip("tmpfs keeps file data in the page cache")
	}
	return dir
}

// dropCache drops file p's pages from the page cache and checks that they
// are gone (mincore): POSIX_FADV_DONTNEED skips pages it cannot evict at
// that moment (busy on a loaded machine), so it is retried, and the global
// drop_caches is the last resort.
func dropCache(t *testing.T, p string) {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	resident := func() int { return residentPages(t, f) }
	for range 10 {
		if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
			t.Fatal(err)
		}
		if resident() == 0 {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("1"), 0); err != nil {
		t.Fatalf("%s: pages stay cached after POSIX_FADV_DONTNEED, and drop_caches: %v", p, err)
	}
	if n := resident(); n != 0 {
		t.Fatalf("%s: %d pages stay cached after POSIX_FADV_DONTNEED and drop_caches", p, n)
	}
}

// writtenVolume opens a store in dir with a 1 MiB volume that has data at
// off, flushed (on disk, in the layer files); the volume closes with t.
func writtenVolume(t *testing.T, dir string, data []byte, off int64) *cow.Volume {
	t.Helper()
	_, v, _ := volumeIn(t, dir, 1<<20)
	if _, err := v.WriteAt(data, off); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	return v
}

// residentPages is how many pages of f are in the page cache (mincore).
func residentPages(t *testing.T, f *os.File) int {
	t.Helper()
	fi, err := f.Stat()
	if err != nil || fi.Size() == 0 {
		t.Fatalf("%s: size %v, %v", f.Name(), fi, err)
	}
	m, err := unix.Mmap(int(f.Fd()), 0, int(fi.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	vec := make([]byte, (len(m)+os.Getpagesize()-1)/os.Getpagesize())
	if _, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(len(m)), uintptr(unsafe.Pointer(&vec[0]))); e != 0 {
		t.Fatal(e)
	}
	n := 0
	for _, b := range vec {
		n += int(b & 1)
	}
	return n
}

// TestStreamingReadsLeaveNoCache: a read of 256 KiB or more that misses
// the page cache leaves nothing cached (O_DIRECT where the buffer, offset
// and length are aligned for it, else RWF_DONTCACHE), through ReadAt and
// through PlanRead's segments; a small read still caches what it read.
func TestStreamingReadsLeaveNoCache(t *testing.T) {
	dir := diskTempDir(t)
	data := bytes.Repeat([]byte("stream.."), 1<<20/8)
	v := writtenVolume(t, dir, data, 0)
	f := headFile(t, filepath.Join(dir, "layers"))
	// The probe reads another file: a no-wait read that misses starts
	// reading pages in (readahead), which could land after dropCache.
	probe := filepath.Join(t.TempDir(), "probe")
	if err := os.WriteFile(probe, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	pf, err := os.Open(probe)
	if err != nil {
		t.Fatal(err)
	}
	var one [1]byte
	_, err = unix.Preadv2(int(pf.Fd()), [][]byte{one[:]}, 0, unix.RWF_DONTCACHE|unix.RWF_NOWAIT)
	pf.Close()
	if errors.Is(err, unix.EOPNOTSUPP) {
		t.Skip("this kernel or filesystem has no RWF_DONTCACHE")
	}

	aligned := alignedBuf(len(data) + 4096)
	for _, c := range []struct {
		name string
		buf  []byte
	}{
		{"aligned", aligned[:len(data)]},
		{"unaligned buffer", aligned[1 : 1+len(data)]},
	} {
		dropCache(t, f.Name())
		if _, err := v.ReadAt(c.buf, 0); err != nil || !bytes.Equal(c.buf, data) {
			t.Fatalf("ReadAt of 1 MiB, %s: %v, equal=%v", c.name, err, bytes.Equal(c.buf, data))
		}
		if n := residentPages(t, f); n != 0 {
			t.Errorf("after a 1 MiB ReadAt from disk, %s: %d pages cached, want 0", c.name, n)
		}
		// The same through a plan, its segments read as the ring does.
		clear(c.buf)
		pl, err := v.PlanRead(c.buf, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, sg := range pl.Segs {
			if n, err := unix.Preadv2(sg.Fd, [][]byte{sg.Buf}, sg.Off, sg.Flags); err != nil || n != len(sg.Buf) {
				t.Fatalf("plan segment %+v: %d, %v", sg.Off, n, err)
			}
		}
		pl.Release()
		if !bytes.Equal(c.buf, data) {
			t.Fatalf("PlanRead of 1 MiB, %s: wrong data", c.name)
		}
		if n := residentPages(t, f); n != 0 {
			t.Errorf("after a 1 MiB PlanRead from disk, %s: %d pages cached, want 0", c.name, n)
		}
	}
	small := make([]byte, 4096)
	if _, err := v.ReadAt(small, 8192); err != nil || !bytes.Equal(small, data[8192:8192+4096]) {
		t.Fatalf("ReadAt of 4 KiB: %v", err)
	}
	if n := residentPages(t, f); n == 0 {
		t.Error("after a 4 KiB ReadAt from disk: nothing cached, want its page")
	}
	pl, err := v.PlanRead(small, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, sg := range pl.Segs {
		if sg.Flags != 0 {
			t.Errorf("PlanRead of 4 KiB: segment flags %#x, want 0", sg.Flags)
		}
	}
	pl.Release()
}

// TestStreamNoWaitStartsNoRead: ReadAtNoWait of a stream that is not all in
// memory fails with EAGAIN without starting to read it into the page cache
// (the read that follows goes past the cache, and would read it twice).
func TestStreamNoWaitStartsNoRead(t *testing.T) {
	dir := diskTempDir(t)
	data := bytes.Repeat([]byte("nowait.."), 1<<20/8)
	v := writtenVolume(t, dir, data, 0)
	f := headFile(t, filepath.Join(dir, "layers"))
	dropCache(t, f.Name())
	buf := alignedBuf(len(data))
	if _, err := v.ReadAtNoWait(buf, 0); !errors.Is(err, syscall.EAGAIN) {
		t.Fatalf("ReadAtNoWait of 1 MiB on disk: %v, want EAGAIN", err)
	}
	time.Sleep(50 * time.Millisecond) // a read it started would land by now
	if n := residentPages(t, f); n != 0 {
		t.Errorf("after ReadAtNoWait of 1 MiB: %d pages cached, want 0", n)
	}
	// Once all of it is cached, the stream reads from memory.
	if _, err := f.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	clear(buf)
	if _, err := v.ReadAtNoWait(buf, 0); err != nil || !bytes.Equal(buf, data) {
		t.Fatalf("ReadAtNoWait of 1 MiB in memory: %v, equal=%v", err, bytes.Equal(buf, data))
	}
}

// alignedBuf returns n bytes at a page boundary (O_DIRECT's alignment).
func alignedBuf(n int) []byte {
	b := make([]byte, n+4096)
	k := int(-uintptr(unsafe.Pointer(&b[0])) & 4095)
	return b[k : k+n]
}
