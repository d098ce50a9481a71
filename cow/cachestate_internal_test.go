package cow

import (
	"bytes"
	"errors"
	"os"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestMayCache: a read without waiting skips cachestat only while the data
// file has no page cached. Writes through the cache set the flag, enough
// misses on a file whose pages are gone clear it, and a write after that
// sets it again, so that what was just written is still read from memory.
func TestMayCache(t *testing.T) {
	dir := t.TempDir()
	var sfs unix.Statfs_t
	if err := unix.Statfs(dir, &sfs); err != nil {
		t.Fatal(err)
	}
	if sfs.Type == unix.TMPFS_MAGIC {
		t.Fatalf("%s is tmpfs: it keeps file data in the page cache, and the test needs a disk", dir)
	}
	s, h := storeWithVolume(t, dir, 4<<20)
	defer s.Close()
	defer h.Close()
	data := bytes.Repeat([]byte("cached.."), BlockSize/8)
	if _, err := h.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if err := h.Flush(); err != nil {
		t.Fatal(err)
	}
	head := h.v.head.Load()
	if !head.mayCache.Load() {
		t.Fatal("mayCache false after a write through the page cache")
	}
	got := make([]byte, BlockSize)
	if _, err := h.ReadAtNoWait(got, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("ReadAtNoWait of a block just written: %v, equal=%v", err, bytes.Equal(got, data))
	}

	// Drop the file's pages: misses keep asking cachestat until
	// recheckMisses of them, then the file is known uncached.
	dropPages(t, head.data)
	for i := range recheckMisses {
		if !head.mayCache.Load() {
			t.Fatalf("mayCache cleared after %d misses, want %d", i, recheckMisses)
		}
		if _, err := h.ReadAtNoWait(got, 0); !errors.Is(err, syscall.EAGAIN) {
			t.Fatalf("ReadAtNoWait of a block on disk only: %v, want EAGAIN", err)
		}
	}
	waitCheck(t, head)
	if head.mayCache.Load() {
		t.Fatalf("mayCache still set after %d misses on a file with no page cached", recheckMisses)
	}
	// Known uncached: the answer is EAGAIN without asking, and the read
	// that follows reads the disk.
	if _, err := h.ReadAtNoWait(got, 0); !errors.Is(err, syscall.EAGAIN) {
		t.Fatalf("ReadAtNoWait on a file known uncached: %v, want EAGAIN", err)
	}
	clear(got)
	if _, err := h.ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("ReadAt: %v, equal=%v", err, bytes.Equal(got, data))
	}
	if head.mayCache.Load() {
		t.Fatal("a read from disk set mayCache: it should leave nothing cached")
	}

	// A small write goes through the cache again: read from memory.
	data2 := bytes.Repeat([]byte("again..."), BlockSize/8)
	if _, err := h.WriteAt(data2, BlockSize); err != nil {
		t.Fatal(err)
	}
	if !head.mayCache.Load() {
		t.Fatal("mayCache false after a write through the cache on a file known uncached")
	}
	if _, err := h.ReadAtNoWait(got, BlockSize); err != nil || !bytes.Equal(got, data2) {
		t.Fatalf("ReadAtNoWait of a block just written: %v, equal=%v", err, bytes.Equal(got, data2))
	}
	// A recheck while pages are cached keeps the flag, and doubles the
	// misses until the next (a whole-file cachestat costs a walk of every
	// cached page).
	at := max(head.recheckAt.Load(), recheckMisses)
	head.recheckCache()
	if !head.mayCache.Load() {
		t.Fatal("recheckCache cleared mayCache with pages cached")
	}
	if got := head.recheckAt.Load(); got != 2*at {
		t.Fatalf("recheckAt %d after a check that found pages, want %d", got, 2*at)
	}
	// Misses on blocks not cached while another is: the flag stays, the
	// reads still answer EAGAIN, and the checks back off.
	big := bytes.Repeat([]byte("dropped."), 8*BlockSize/8)
	if _, err := h.WriteAt(big, 2*BlockSize); err != nil {
		t.Fatal(err)
	}
	if err := h.Flush(); err != nil {
		t.Fatal(err)
	}
	ps, err := head.where(nil, 2*BlockSize, 8*BlockSize)
	if err != nil {
		t.Fatal(err)
	}
	for _, pc := range ps {
		if err := unix.Fadvise(int(head.data.Fd()), pc.off, int64(pc.n), unix.FADV_DONTNEED); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 4 * recheckMisses {
		if _, err := h.ReadAtNoWait(got, int64(2+i%8)*BlockSize); !errors.Is(err, syscall.EAGAIN) {
			t.Fatalf("ReadAtNoWait of a block written past the cache: %v, want EAGAIN", err)
		}
		waitCheck(t, head) // one check at a time: each doubles recheckAt
	}
	waitCheck(t, head)
	if !head.mayCache.Load() {
		t.Fatal("mayCache cleared while a block is cached")
	}
	if got := head.recheckAt.Load(); got < 4*at {
		t.Fatalf("recheckAt %d after misses with pages cached, want at least %d", got, 4*at)
	}
}

// waitCheck waits for a recheckCache goroutine the misses started.
func waitCheck(t *testing.T, l *layer) {
	t.Helper()
	for range 500 {
		if !l.checking.Load() {
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
	t.Fatal("recheckCache still running after 1 s")
}

// dropPages drops f's pages from the page cache and waits until cachestat
// sees none (POSIX_FADV_DONTNEED skips pages it cannot evict at that
// moment, so it is retried).
func dropPages(t *testing.T, f *os.File) {
	t.Helper()
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	var cs unix.Cachestat_t
	for range 50 {
		if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
			t.Fatal(err)
		}
		r := unix.CachestatRange{}
		if err := unix.Cachestat(uint(f.Fd()), &r, &cs, 0); err != nil {
			t.Fatal(err)
		}
		if cs.Cache == 0 {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%s: %d pages stay cached after POSIX_FADV_DONTNEED", f.Name(), cs.Cache)
}
