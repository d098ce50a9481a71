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

	// Drop the layer file's clean pages: the data is on disk only, and
	// ReadAtNoWait fails without starting to read it (cachestat first).
	files, err := filepath.Glob(filepath.Join(dir, "layers", "*.data"))
	if err != nil || len(files) != 1 {
		t.Fatalf("layer data files: %v, %v", files, err)
	}
	dropCache(t, files[0])
	if _, err := v.ReadAtNoWait(got, 64<<10); !errors.Is(err, syscall.EAGAIN) {
		t.Fatalf("ReadAtNoWait of data on disk only: %v, want EAGAIN", err)
	}
	if _, err := v.ReadAt(got, 64<<10); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("ReadAt: %v, equal=%v", err, bytes.Equal(got, data))
	}
	// Once cached (read here through the file itself, all of it, wherever
	// the layer put the blocks: the engine's reads from disk leave nothing
	// cached), it reads from memory.
	if _, err := os.ReadFile(files[0]); err != nil {
		t.Fatal(err)
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

// TestReadsLeaveNoCache: a read that misses the page cache leaves nothing
// cached (O_DIRECT where the buffer, offset and length are aligned for it,
// else RWF_DONTCACHE), 1 MiB or 4 KiB, through ReadAt and through
// PlanRead's segments.
func TestReadsLeaveNoCache(t *testing.T) {
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
		off  int64
	}{
		{"1 MiB aligned", aligned[:len(data)], 0},
		{"1 MiB, unaligned buffer", aligned[1 : 1+len(data)], 0},
		{"4 KiB aligned", aligned[:4096], 8192},
		{"4 KiB, unaligned buffer", aligned[1 : 1+4096], 8192},
	} {
		want := data[c.off : c.off+int64(len(c.buf))]
		dropCache(t, f.Name())
		if _, err := v.ReadAt(c.buf, c.off); err != nil || !bytes.Equal(c.buf, want) {
			t.Fatalf("ReadAt of %s: %v, equal=%v", c.name, err, bytes.Equal(c.buf, want))
		}
		if n := residentPages(t, f); n != 0 {
			t.Errorf("after a ReadAt of %s from disk: %d pages cached, want 0", c.name, n)
		}
		// The same through a plan, its segments read as the ring does.
		clear(c.buf)
		pl, err := v.PlanRead(c.buf, c.off)
		if err != nil {
			t.Fatal(err)
		}
		for _, sg := range pl.Segs {
			if n, err := unix.Preadv2(sg.Fd, [][]byte{sg.Buf}, sg.Off, sg.Flags); err != nil || n != len(sg.Buf) {
				t.Fatalf("plan segment %+v: %d, %v", sg.Off, n, err)
			}
		}
		pl.Release()
		if !bytes.Equal(c.buf, want) {
			t.Fatalf("PlanRead of %s: wrong data", c.name)
		}
		if n := residentPages(t, f); n != 0 {
			t.Errorf("after a PlanRead of %s from disk: %d pages cached, want 0", c.name, n)
		}
	}
}

// TestNoWaitStartsNoRead: ReadAtNoWait of data that is not all in memory
// fails with EAGAIN without starting to read it into the page cache (the
// read that follows goes past the cache, and would read it twice).
func TestNoWaitStartsNoRead(t *testing.T) {
	dir := diskTempDir(t)
	data := bytes.Repeat([]byte("nowait.."), 1<<20/8)
	v := writtenVolume(t, dir, data, 0)
	f := headFile(t, filepath.Join(dir, "layers"))
	for _, n := range []int{len(data), 4096} {
		dropCache(t, f.Name())
		buf := alignedBuf(n)
		if _, err := v.ReadAtNoWait(buf, 0); !errors.Is(err, syscall.EAGAIN) {
			t.Fatalf("ReadAtNoWait of %d bytes on disk: %v, want EAGAIN", n, err)
		}
		time.Sleep(50 * time.Millisecond) // a read it started would land by now
		if got := residentPages(t, f); got != 0 {
			t.Errorf("after ReadAtNoWait of %d bytes: %d pages cached, want 0", n, got)
		}
		// Once all of it is cached, it reads from memory.
		if _, err := f.ReadAt(buf, 0); err != nil {
			t.Fatal(err)
		}
		clear(buf)
		if _, err := v.ReadAtNoWait(buf, 0); err != nil || !bytes.Equal(buf, data[:n]) {
			t.Fatalf("ReadAtNoWait of %d bytes in memory: %v, equal=%v", n, err, bytes.Equal(buf, data[:n]))
		}
	}
}

// alignedBuf returns n bytes at a page boundary (O_DIRECT's alignment).
func alignedBuf(n int) []byte {
	b := make([]byte, n+4096)
	k := int(-uintptr(unsafe.Pointer(&b[0])) & 4095)
	return b[k : k+n]
}
