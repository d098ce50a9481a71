package cow

import (
	"errors"
	"os"

	"golang.org/x/sys/unix"
)

// Reads that miss the page cache do not fill it, whatever their size: the
// O_DIRECT twin takes an aligned read (every read of the loop device over
// the FUSE file is whole sectors into page-aligned buffers), RWF_DONTCACHE
// (Linux 6.14+ on ext4, xfs and others) any other. A volume is a block
// device: the filesystem on it caches what it reads itself, as over the
// loop device of a plain file, so a second copy here was memory for
// nothing. And a small read that misses costs more through the cache: its
// RWF_NOWAIT try starts the read of the page on the FUSE ring's thread (a
// page cache read without waiting still allocates and inserts the folio,
// maps the block and submits the I/O, and may wait for an extent tree
// block), then the ring waits for the page and copies it; cachestat tells
// the miss without I/O, and the ring reads the block directly. The 4 KiB
// folios that POSIX_FADV_RANDOM reads would leave also make a later
// sequential rewrite of the same range cost more CPU than one over folios
// its own writes left (BenchmarkSeqRewriteCacheStates). Data already cached
// stays cached (small writes go through the cache, and reads of what was
// just written find it there). See docs/DECISIONS.md, "Reads that miss the
// page cache go past it".

// dontcacheFlag returns RWF_DONTCACHE if reads of f take it, else 0. The
// kernel checks the flag before any I/O (EOPNOTSUPP where the kernel or the
// filesystem lacks it); the probe reads one byte without waiting.
func dontcacheFlag(f *os.File) int {
	var b [1]byte
	_, err := unix.Preadv2(int(f.Fd()), [][]byte{b[:]}, 0, unix.RWF_DONTCACHE|unix.RWF_NOWAIT)
	if err == nil || errors.Is(err, unix.EAGAIN) {
		return unix.RWF_DONTCACHE
	}
	return 0
}

// uncachedFile returns where a read of p at off that misses the page cache
// goes (see above): the O_DIRECT
// twin when the read is aligned for it (no page cache to fill and drop, no
// copy), else the data file with RWF_DONTCACHE where it has that. A direct
// read first writes back dirty cached pages of its range, so it sees every
// write that returned.
func (l *layer) uncachedFile(p []byte, off int64) (fd, flags int) {
	if f := l.directFile(); f != nil && l.aligned(p, off) {
		return int(f.Fd()), 0
	}
	if l.dontcache == 0 {
		l.cachedNow() // this read fills the page cache
	}
	return int(l.data.Fd()), l.dontcache
}

// cached reports whether all of the range p at off is in the data file's
// page cache (cachestat(2), Linux 6.5+; true where it is missing, so that
// the caller tries the cache). It starts no I/O. A file known to have no
// cached pages (mayCache) is not asked: a syscall is a large part of a
// small read's cost in the serving process (docs/DECISIONS.md, "No-wait
// reads ask cachestat, skipped on uncached files").
func (l *layer) cached(p []byte, off int64) bool {
	if !l.mayCache.Load() {
		return false
	}
	var cs unix.Cachestat_t
	r := unix.CachestatRange{Off: uint64(off), Len: uint64(len(p))}
	if err := unix.Cachestat(uint(l.data.Fd()), &r, &cs, 0); err != nil {
		return true
	}
	ps := uint64(os.Getpagesize())
	pages := (uint64(off)+uint64(len(p))+ps-1)/ps - uint64(off)/ps
	if cs.Cache >= pages {
		return true
	}
	if n := l.misses.Add(1); n >= max(l.recheckAt.Load(), recheckMisses) && l.checking.CompareAndSwap(false, true) {
		l.misses.Store(0)
		go func() {
			defer l.checking.Store(false)
			l.recheckCache()
		}()
	}
	return false
}

// recheckMisses is how many cachestat misses make cached ask whether the
// data file has any cached page left (the kernel reclaimed them, a cold
// start, a drop of the cache). While the file does have pages cached, each
// check doubles the misses until the next, up to recheckMax: a
// whole-file cachestat walks every cached page of the file, and after 4
// KiB random writes to an 8 GiB volume that is hundreds of thousands, which
// takes milliseconds. So the check also runs on a goroutine of its own, one
// at a time per layer, not on the thread that reads (docs/DECISIONS.md,
// "Whole-file cache recheck backs off, off the ring's thread").
const (
	recheckMisses = 64
	recheckMax    = 1 << 16
)

// cachedNow records that the data file may have pages in the page cache
// now; writes through the cache call it after writing. Only the engine's
// writes through the cache add pages to a data file: its reads from disk
// leave nothing cached (uncachedFile), and direct writes drop what was
// cached. Reads of pages cached by someone else go past them while the
// flag is false, which costs nothing but the copy they could have saved:
// a direct read sees the file as it is (it writes dirty pages back
// first).
func (l *layer) cachedNow() {
	if !l.mayCache.Load() {
		l.mayCache.Store(true)
	}
}

// recheckCache clears mayCache if the data file has no page cached. The
// flag is cleared before asking, so a write through the cache that the
// question misses sets it again after (cachedNow follows the write).
func (l *layer) recheckCache() {
	// Under ioMu: the data file's descriptor must not be closed (and its
	// number reused) while cachestat asks about it.
	l.ioMu.RLock()
	defer l.ioMu.RUnlock()
	if l.closed {
		return
	}
	l.mayCache.Store(false)
	var cs unix.Cachestat_t
	r := unix.CachestatRange{} // Len 0: to the end of the file
	if err := unix.Cachestat(uint(l.data.Fd()), &r, &cs, 0); err != nil || cs.Cache > 0 {
		l.mayCache.Store(true)
		l.recheckAt.Store(min(max(l.recheckAt.Load(), recheckMisses)*2, recheckMax))
		return
	}
	l.recheckAt.Store(recheckMisses)
}
