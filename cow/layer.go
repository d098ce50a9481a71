package cow

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/cow/internal/ondisk"
)

// journalGrow is how much zero-filled space the journal keeps ahead of its
// last record. Overwriting blocks that already exist makes fdatasync skip the
// inode update an append needs (docs/DECISIONS.md, "Snapshot cost: one
// catalog fdatasync").
const journalGrow = 64 << 10

// layer is one data file plus the journal of which blocks it owns. A head
// layer takes writes; a frozen layer never changes its view again (a merge
// may copy blocks into it that its view already showed).
type layer struct {
	num    uint32
	parent *layer // nil for a base layer; guarded by Store.topo
	frozen bool   // guarded by Store.topo
	size   atomic.Int64

	// The layer appends the blocks it comes to own to its data file and
	// locs says where (locs.go).
	locs locMap // guarded by treeMu
	// next is the data file's next free file block; fileEnd the data
	// file's size in blocks, grown ahead of the appends (grow) so that
	// writes never extend the file.
	next    atomic.Uint64
	fileEnd atomic.Uint64
	growMu  sync.Mutex

	// ioMu guards the lifetime of data: readers hold it shared around pread,
	// removal takes it exclusively before closing.
	ioMu   sync.RWMutex
	closed bool
	// pins counts read and write plans (Volume.PlanRead, PlanWrite) that
	// will still use the data files; close waits for them.
	pins sync.WaitGroup
	// data and journal are created on first use (filesMu), not with the
	// layer: a file creation in the same ext4 journal commit as the
	// catalog's fdatasync would make CreateSnapshot wait for it
	// (docs/DECISIONS.md, "Snapshot cost: one catalog fdatasync"). Only a
	// layer that owns blocks needs files, and owning a block requires them
	// first.
	// Lock order: filesMu before flushMu.
	filesMu sync.Mutex
	data    *os.File
	// dontcache is RWF_DONTCACHE where the data file's filesystem takes it
	// (0 elsewhere): reads that miss the page cache pass it where O_DIRECT
	// does not take them.
	dontcache int
	// direct is the data file opened again with O_DIRECT for large aligned
	// writes (directWrite), opened on the first one; directState says
	// whether that was tried and worked.
	direct      atomic.Pointer[os.File]
	directState atomic.Int32 // directUntried, directOn, directOff
	dioMem      uintptr      // buffer alignment O_DIRECT needs
	dioOff      int64        // offset and length alignment O_DIRECT needs
	// mayCache is false only when the data file is known to have no pages
	// in the page cache: a read without waiting then skips cachestat
	// (mayBeCached). misses counts cachestat misses since the last check,
	// recheckAt how many make the next one (recheckCache).
	mayCache  atomic.Bool
	misses    atomic.Uint32
	recheckAt atomic.Uint32
	checking  atomic.Bool // a recheckCache goroutine runs

	// mergedInto is set when this layer's blocks were merged into its child:
	// tree entries naming this layer now resolve to that child's data file.
	mergedInto atomic.Pointer[layer]
	aliases    []uint32 // layers merged into this one; guarded by Store.topo

	// treeMu guards tree (only a head's tree is ever changed) and pending.
	treeMu  sync.RWMutex
	tree    tree
	pending []ondisk.Range // owned since the last flush, not yet in the journal

	dirty atomic.Bool // data written since the last fdatasync
	// unsynced counts bytes written through the page cache since
	// writeback was last started (writeBehind); kicking is set while a
	// goroutine starts it.
	unsynced atomic.Int64
	kicking  atomic.Bool
	owned    atomic.Int64 // blocks this layer owns (journal plus pending)

	flushMu   sync.Mutex // serializes journal appends and flushes
	journal   *os.File
	jOff      int64 // where the next record goes
	jAlloc    int64 // end of the zero-filled, written region
	dirSynced bool  // the layers directory was fsynced since the files were created
}

func layerPaths(dir string, num uint32) (data, journal string) {
	base := filepath.Join(dir, fmt.Sprintf("%08x", num))
	return base + ".data", base + ".map"
}

func newLayerStruct(num uint32, size int64, arena *locArena) *layer {
	l := &layer{num: num}
	l.locs.arena = arena
	l.size.Store(size)
	return l
}

// ensureFiles creates the layer's files if they do not exist yet. The
// journal comes first: a data file without a journal is an orphan of a crash
// and is recreated. The directory is synced by the first journal append.
func (l *layer) ensureFiles(dir string) error {
	l.filesMu.Lock()
	defer l.filesMu.Unlock()
	if l.data != nil {
		return nil
	}
	dp, jp := layerPaths(dir, l.num)
	j, err := os.OpenFile(jp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return ioErr(err)
	}
	img := append(ondisk.EncodeJournalHeader(ondisk.JournalHeader{Layer: l.num}),
		make([]byte, 4096-ondisk.JournalHeaderSize)...)
	if _, err := j.WriteAt(img, 0); err != nil {
		j.Close()
		return ioErr(err)
	}
	data, err := openData(dp, os.O_RDWR|os.O_CREATE|os.O_TRUNC)
	if err != nil {
		j.Close()
		return ioErr(err)
	}
	adviseRandom(data)
	l.dontcache = dontcacheFlag(data)
	l.mayCache.Store(true) // the probe may have left a page
	l.flushMu.Lock()
	l.journal, l.jOff, l.jAlloc, l.dirSynced = j, ondisk.JournalHeaderSize, int64(len(img)), false
	l.flushMu.Unlock()
	l.data = data
	return nil
}

// Page-cache folio sizes and the layer data files.
//
// The kernel caches a file in folios as large as the write or readahead that
// brought them in (up to megabytes on ext4 and xfs). A 4 KiB write into such a
// folio walks all its buffers and dirties the whole folio, so after one
// sequential pass (a 1 MiB fio job, mkfs, a restore) random 4 KiB writes to
// the volume run at a fraction of their speed on a fresh file. So writes go
// to the kernel in pieces of at most writePiece bytes (still several times
// what the disk takes), and the data files are opened with
// POSIX_FADV_RANDOM: readahead, whose large folios do the same to writes
// after a sequential read, stays off; a FUSE read already asks for exactly
// what the loop device above needs (docs/DECISIONS.md, "Layer writes in 64
// KiB pieces, readahead off").
const writePiece = 64 << 10

// openData opens a layer data file with O_NOATIME where the kernel lets
// this process (the file's owner, or CAP_FOWNER): every read of a volume
// is a read of layer files, and relatime still updates a file's atime on
// the first read after each write, an inode write on the read path
// (docs/DECISIONS.md, "Layer files opened with O_NOATIME"). Nothing reads
// layer atimes.
func openData(path string, flag int) (*os.File, error) {
	f, err := os.OpenFile(path, flag|unix.O_NOATIME, 0o600)
	if errors.Is(err, os.ErrPermission) {
		f, err = os.OpenFile(path, flag, 0o600)
	}
	return f, err
}

// adviseRandom turns readahead off for a layer data file (see writePiece).
// It is advice: a filesystem that ignores it costs speed, not correctness.
func adviseRandom(f *os.File) {
	_ = unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_RANDOM)
}

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

// writeData writes all of p at off into the layer's data file, in pieces of
// at most writePiece bytes, or past the page cache (directWrite).
func (l *layer) writeData(p []byte, off int64) error {
	if done, err := l.writeDirect(p, off); done {
		return err
	}
	start, length := off, int64(len(p))
	for len(p) > 0 {
		n := min(len(p), writePiece)
		if _, err := l.data.WriteAt(p[:n], off); err != nil {
			l.cachedNow()
			return ioErr(err)
		}
		p, off = p[n:], off+int64(n)
	}
	// After the write: a check that clears the flag before it sees these
	// pages would otherwise leave them unseen (recheckCache). Until then,
	// reads go past them, which is coherent.
	l.cachedNow()
	if length >= writebackStart {
		// Start writing large writes back now, without waiting: a
		// sequential stream then never piles up dirty pages until the
		// kernel throttles the writer, and the next flush has little
		// left to do. Small writes stay in the page cache, where
		// rewrites of a block cost nothing.
		_ = unix.SyncFileRange(int(l.data.Fd()), start, length, unix.SYNC_FILE_RANGE_WRITE)
	} else {
		l.writeBehind(length)
	}
	return nil
}

// writebackStart is the write size from which writeData starts writeback.
const writebackStart = 256 << 10

// behindBytes is how much data written through the page cache makes the
// layer start writeback of its whole data file, in a goroutine. Without it
// the kernel writes dirty pages back after 30 s or past 10% of memory, so a
// burst of small writes would all wait for the next flush, after the writes
// themselves. Started behind the writes, a flush, and so a snapshot's
// freeze, finds at most about this much left to write (docs/DECISIONS.md,
// "Writeback behind small writes").
const behindBytes = 32 << 20

// writeBehind counts n bytes of small writes through the page cache (large
// ones start their own writeback) and, past behindBytes, starts writeback
// of the data file without waiting for it.
func (l *layer) writeBehind(n int64) {
	if l.unsynced.Add(n) < behindBytes || !l.kicking.CompareAndSwap(false, true) {
		return
	}
	l.unsynced.Store(0)
	go func() {
		defer l.kicking.Store(false)
		l.ioMu.RLock()
		defer l.ioMu.RUnlock()
		if !l.closed {
			_ = unix.SyncFileRange(int(l.data.Fd()), 0, 0, unix.SYNC_FILE_RANGE_WRITE)
		}
	}()
}

// directWrite is the write size from which writes that O_DIRECT can take
// (aligned buffer, offset and length; the FUSE ring's buffers are page
// aligned) go past the page cache. A large write is a stream (fio at 1 MiB,
// the writeback of the filesystem on the volume, a restore) that the page
// cache of the volume's own filesystem holds already: through this page
// cache, its copy into new folios and their writeback cost the serving
// process several times the CPU per byte of direct writes, and more still
// after reads had left the range in 4 KiB folios
// (BenchmarkSeqRewriteCacheStates; docs/DECISIONS.md, "Large writes go
// past the page cache"). The kernel keeps the cache coherent: a direct
// write first writes back and afterwards drops cached pages of its range.
const directWrite = 256 << 10

const (
	directUntried = iota
	directOn
	directOff
)

// writeDirect writes p at off with O_DIRECT if p is a large write the data
// file's filesystem can take that way; done is false if it did not try.
func (l *layer) writeDirect(p []byte, off int64) (done bool, err error) {
	if len(p) < directWrite {
		return false, nil
	}
	f := l.directFile()
	if f == nil || !l.aligned(p, off) {
		return false, nil
	}
	n, err := f.WriteAt(p, off)
	if errors.Is(err, unix.EINVAL) && n == 0 {
		// Refused after all (a filesystem whose rules statx does not
		// tell): buffered from now on.
		l.directState.Store(directOff)
		return false, nil
	}
	return true, ioErr(err)
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

// aligned reports whether O_DIRECT takes p at off; directFile must have
// returned a file.
func (l *layer) aligned(p []byte, off int64) bool {
	return uintptr(unsafe.Pointer(&p[0]))%l.dioMem == 0 && off%l.dioOff == 0 && int64(len(p))%l.dioOff == 0
}

// directFile returns the O_DIRECT twin of the data file, opening it on the
// first call; nil where the filesystem has no direct I/O.
func (l *layer) directFile() *os.File {
	switch l.directState.Load() {
	case directOn:
		return l.direct.Load()
	case directOff:
		return nil
	}
	l.filesMu.Lock()
	defer l.filesMu.Unlock()
	if l.directState.Load() != directUntried {
		return l.direct.Load()
	}
	if l.data == nil {
		return nil // no files yet: decided once they exist
	}
	l.directState.Store(directOff)
	var st unix.Statx_t
	if err := unix.Statx(int(l.data.Fd()), "", unix.AT_EMPTY_PATH, unix.STATX_DIOALIGN, &st); err != nil ||
		st.Mask&unix.STATX_DIOALIGN == 0 || st.Dio_mem_align == 0 || st.Dio_offset_align == 0 {
		return nil
	}
	f, err := openData(fmt.Sprintf("/proc/self/fd/%d", l.data.Fd()), os.O_RDWR|unix.O_DIRECT)
	if err != nil {
		return nil
	}
	l.dioMem, l.dioOff = uintptr(st.Dio_mem_align), int64(st.Dio_offset_align)
	l.direct.Store(f)
	l.directState.Store(directOn)
	return f
}

// hasFiles reports whether the layer's files exist.
func (l *layer) hasFiles() bool {
	l.filesMu.Lock()
	defer l.filesMu.Unlock()
	return l.data != nil
}

// openLayerFiles opens an existing layer and returns its owned ranges. A
// layer without a journal never owned a block: it stays without files.
func openLayerFiles(dir string, num uint32, size int64, arena *locArena) (*layer, []ondisk.Range, error) {
	l := newLayerStruct(num, size, arena)
	dp, jp := layerPaths(dir, num)
	img, err := os.ReadFile(jp)
	if errors.Is(err, os.ErrNotExist) {
		if err := os.Remove(dp); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, nil, ioErr(err)
		}
		return l, nil, nil
	}
	if err != nil {
		return nil, nil, ioErr(err)
	}
	h, ranges, next, err := ondisk.DecodeJournal(img)
	if errors.Is(err, ondisk.ErrIdentityJournal) {
		return nil, nil, fmt.Errorf("%w: layer %d has journal version 1", ErrIdentityLayout, num)
	}
	if err != nil && !ondisk.HasValidRecord(img) {
		// A header that never became durable: records only count after an
		// fdatasync that also covers the header, so this layer owned
		// nothing. Start it again without files.
		for _, p := range []string{dp, jp} {
			if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
				return nil, nil, ioErr(err)
			}
		}
		return l, nil, nil
	}
	if err == nil && h.Layer != num {
		err = fmt.Errorf("journal of layer %d names layer %d", num, h.Layer)
	}
	if err != nil {
		return nil, nil, errf(ErrCorrupt, "layer %d: %v", num, err)
	}
	data, err := openData(dp, os.O_RDWR)
	if errors.Is(err, os.ErrNotExist) && len(ranges) == 0 {
		// Crashed between creating the journal and the data file.
		if err := os.Remove(jp); err != nil {
			return nil, nil, ioErr(err)
		}
		return l, nil, nil
	}
	if err != nil {
		return nil, nil, errf(ErrCorrupt, "layer %d: journal has records but data file: %v", num, err)
	}
	adviseRandom(data)
	l.dontcache = dontcacheFlag(data)
	l.mayCache.Store(true) // an earlier process may have left pages cached
	j, err := os.OpenFile(jp, os.O_RDWR, 0)
	if err != nil {
		data.Close()
		return nil, nil, ioErr(err)
	}
	l.data, l.journal, l.jOff, l.jAlloc, l.dirSynced = data, j, next, int64(len(img)), true
	for _, r := range ranges {
		if !fitsLocs(r) {
			l.close()
			return nil, nil, errf(ErrCorrupt, "layer %d: blocks %d+%d at file block %d, beyond %d", num, r.Start, r.Count, r.Loc, uint64(maxFileBlocks))
		}
		l.locs.set(r.Start, r.Count, r.Loc)
	}
	l.owned.Store(int64(l.locs.blocks))
	if err := l.reclaim(); err != nil {
		l.close()
		return nil, nil, err
	}
	return l, ranges, nil
}

// reclaim frees the space of a dense data file that no location uses:
// blocks written and never recorded (a crash before the flush, a merge
// stopped midway) become holes, and the file ends after the last block a
// location uses.
func (l *layer) reclaim() error {
	var used [][2]uint64
	l.locs.forEach(func(_, count, loc uint64) {
		if loc != ondisk.LocZero {
			used = append(used, [2]uint64{loc, loc + count})
		}
	})
	sort.Slice(used, func(i, j int) bool { return used[i][0] < used[j][0] })
	var at uint64
	for _, u := range used {
		if u[0] > at {
			if err := l.punch(at, u[0]-at); err != nil {
				return err
			}
		}
		at = max(at, u[1])
	}
	if err := l.data.Truncate(int64(at) << blockShift); err != nil {
		return ioErr(err)
	}
	l.next.Store(at)
	l.fileEnd.Store(at)
	return nil
}

// punch frees n file blocks from file block fb of a dense layer's data file.
func (l *layer) punch(fb, n uint64) error {
	err := unix.Fallocate(int(l.data.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE,
		int64(fb)<<blockShift, int64(n)<<blockShift)
	return ioErr(err)
}

// growStep is how far ahead of its appends a dense data file grows.
const growStep = (64 << 20) >> blockShift

// alloc reserves n file blocks at the end of a dense layer's data file and
// returns the first. Blocks reserved and never recorded are freed by
// unreserve, or by reclaim at the next open.
func (l *layer) alloc(n uint64) (uint64, error) {
	first := l.next.Add(n) - n
	end := first + n
	if end > maxFileBlocks {
		// 16 TiB of file blocks: ext4's limit on a file, and locExt's.
		return 0, fmt.Errorf("%w: layer %d's data file would pass %d blocks", ErrNoSpace, l.num, uint64(maxFileBlocks))
	}
	if l.fileEnd.Load() >= end {
		return first, nil
	}
	l.growMu.Lock()
	defer l.growMu.Unlock()
	if l.fileEnd.Load() < end {
		size := (end + growStep - 1) / growStep * growStep
		// Sparse: the file's size, no space. Writes inside the size do
		// not extend the file, which ext4 would make take its inode lock
		// exclusively.
		if err := l.data.Truncate(int64(size) << blockShift); err != nil {
			return 0, ioErr(err)
		}
		l.fileEnd.Store(size)
	}
	return first, nil
}

// unreserve frees the file blocks of records that will not be recorded
// (a write or merge that failed, copies a merge did not need), as far as
// it can: what stays allocated is freed by reclaim at the next open.
func (l *layer) unreserve(recs []ondisk.Range) {
	for _, r := range recs {
		if r.Loc != ondisk.LocZero && r.Count > 0 {
			_ = l.punch(r.Loc, r.Count)
		}
	}
}

// piece is where part of a read or write of a layer's blocks lies in its
// data file.
type piece struct {
	off  int64 // in the data file
	n    int   // bytes
	zero bool  // reads as zeros and has no data
}

// where appends to dst the pieces of the data file that hold bytes [off,
// off+n) of the volume, blocks the layer owns, in order.
func (l *layer) where(dst []piece, off int64, n int) ([]piece, error) {
	l.treeMu.RLock()
	defer l.treeMu.RUnlock()
	end := off + int64(n)
	for pos := off; pos < end; {
		b := uint64(pos >> blockShift)
		loc, cnt, ok := l.locs.get(b)
		if !ok {
			return dst, errf(ErrCorrupt, "layer %d: block %d has no location", l.num, b)
		}
		stop := min(end, int64(b+cnt)<<blockShift)
		p := piece{n: int(stop - pos), zero: loc == ondisk.LocZero}
		if !p.zero {
			p.off = int64(loc)<<blockShift + pos&(BlockSize-1)
		}
		if k := len(dst); k > 0 && dst[k-1].zero == p.zero && (p.zero || dst[k-1].off+int64(dst[k-1].n) == p.off) {
			dst[k-1].n += p.n
		} else {
			dst = append(dst, p)
		}
		pos = stop
	}
	return dst, nil
}

// writePlaced writes p at volume offset off into blocks that have their
// place in the data file already (placedAll).
func (l *layer) writePlaced(p []byte, off int64) error {
	var buf [4]piece
	ps, err := l.where(buf[:0], off, len(p))
	if err != nil {
		return err
	}
	for _, pc := range ps {
		if pc.zero {
			return errf(ErrCorrupt, "layer %d: write at %d into blocks without a place", l.num, off)
		}
		if err := l.writeData(p[:pc.n], pc.off); err != nil {
			return err
		}
		p = p[pc.n:]
	}
	return nil
}

// placedAll reports whether the layer owns blocks [first, last] and has
// data places for them: a write to them goes in place.
func (l *layer) placedAll(first, last uint64) bool {
	l.treeMu.RLock()
	defer l.treeMu.RUnlock()
	for b := first; b <= last; {
		loc, n, ok := l.locs.get(b)
		if !ok || loc == ondisk.LocZero {
			return false
		}
		b += n
	}
	return true
}

// place records that a dense head owns the blocks of recs at their
// locations (written already, or LocZero), in the index, the locations
// and the records of the next flush, in that order.
func (l *layer) place(recs []ondisk.Range) {
	l.treeMu.Lock()
	defer l.treeMu.Unlock()
	before := l.locs.blocks
	for _, r := range recs {
		l.locs.set(r.Start, r.Count, r.Loc)
		l.tree.setRange(r.Start, r.End(), l.num)
		l.pending = append(l.pending, r)
	}
	l.owned.Add(int64(l.locs.blocks - before))
}

// joinRecords merges neighbouring records of a dense layer that continue
// each other, keeping their order: a later record for a block replaces an
// earlier one's location.
func joinRecords(recs []ondisk.Range) []ondisk.Range {
	var out []ondisk.Range
	for _, r := range recs {
		if n := len(out); n > 0 {
			p := &out[n-1]
			zeros := p.Loc == ondisk.LocZero && r.Loc == ondisk.LocZero
			follows := p.Loc != ondisk.LocZero && r.Loc != ondisk.LocZero && p.Loc+p.Count == r.Loc
			if p.End() == r.Start && (zeros || follows) {
				p.Count += r.Count
				continue
			}
		}
		out = append(out, r)
	}
	return out
}

// coalesce sorts ranges and merges overlapping or adjacent ones.
func coalesce(ranges []ondisk.Range) []ondisk.Range {
	rs := append([]ondisk.Range(nil), ranges...)
	sort.Slice(rs, func(i, j int) bool { return rs[i].Start < rs[j].Start })
	out := rs[:0]
	for _, r := range rs {
		if n := len(out); n > 0 && r.Start <= out[n-1].End() {
			if r.End() > out[n-1].End() {
				out[n-1].Count = r.End() - out[n-1].Start
			}
			continue
		}
		out = append(out, r)
	}
	return out
}

// readRanges reads the layer's durable journal records from disk.
func (l *layer) readRanges() ([]ondisk.Range, error) {
	l.flushMu.Lock()
	defer l.flushMu.Unlock()
	if l.journal == nil {
		return nil, nil
	}
	img := make([]byte, l.jOff)
	if _, err := l.journal.ReadAt(img, 0); err != nil && !errors.Is(err, io.EOF) {
		return nil, ioErr(err)
	}
	_, ranges, _, err := ondisk.DecodeJournal(img)
	if err != nil {
		return nil, errf(ErrCorrupt, "layer %d: %v", l.num, err)
	}
	return ranges, nil
}

// appendRecords writes records to the journal and makes them durable. The
// caller holds flushMu and has already made the data they describe durable.
func (l *layer) appendRecords(dir string, ranges []ondisk.Range) error {
	if len(ranges) == 0 {
		return nil
	}
	var buf []byte
	for _, r := range joinRecords(ranges) {
		buf = ondisk.EncodeRecord(buf, r)
	}
	end := l.jOff + int64(len(buf))
	if end > l.jAlloc {
		grow := (end - l.jAlloc + journalGrow - 1) / journalGrow * journalGrow
		if _, err := l.journal.WriteAt(make([]byte, grow), l.jAlloc); err != nil {
			return ioErr(err)
		}
		l.jAlloc += grow
	}
	if _, err := l.journal.WriteAt(buf, l.jOff); err != nil {
		return ioErr(err)
	}
	if !l.dirSynced {
		// The files' directory entries must be durable before a record in
		// them can be relied on.
		if err := syncDir(dir); err != nil {
			return err
		}
	}
	if err := unix.Fdatasync(int(l.journal.Fd())); err != nil {
		return ioErr(err)
	}
	l.dirSynced = true
	l.jOff = end
	return nil
}

// flush makes every write to the layer that completed before the call durable:
// first the data, then the journal records that point at it.
func (l *layer) flush(dir string) error {
	// No files: nothing was ever written (owning needs the files). Checked
	// before flushMu: ensureFiles takes filesMu, then flushMu.
	if !l.hasFiles() {
		return nil
	}
	l.flushMu.Lock()
	defer l.flushMu.Unlock()
	// Take the records before syncing the data: every record taken describes a
	// write that finished before this point, so the sync below covers it.
	l.treeMu.Lock()
	recs := l.pending
	l.pending = nil
	l.treeMu.Unlock()
	putBack := func() {
		l.treeMu.Lock()
		l.pending = append(recs, l.pending...)
		l.treeMu.Unlock()
	}
	if l.dirty.Swap(false) || len(recs) > 0 {
		if err := unix.Fdatasync(int(l.data.Fd())); err != nil {
			l.dirty.Store(true)
			putBack()
			return ioErr(err)
		}
	}
	if err := l.appendRecords(dir, recs); err != nil {
		putBack()
		return err
	}
	return nil
}

// pin keeps the data files open until pins.Done (a planned write); false if
// the layer is closed already.
func (l *layer) pin() bool {
	l.ioMu.RLock()
	defer l.ioMu.RUnlock()
	if l.closed {
		return false
	}
	l.pins.Add(1)
	return true
}

// close releases the files; it waits for in-flight reads, those under
// ioMu and those of read and write plans that pinned the data files.
func (l *layer) close() {
	l.ioMu.Lock()
	if l.closed {
		l.ioMu.Unlock()
		return
	}
	l.closed = true
	l.ioMu.Unlock()
	// No pin is taken once closed is set (pins are taken under ioMu).
	l.pins.Wait()
	// Readers look locations up under ioMu, which closed now turns away,
	// so none is left to read the arena slots given back here.
	l.treeMu.Lock()
	l.locs.release()
	l.treeMu.Unlock()
	l.filesMu.Lock()
	defer l.filesMu.Unlock()
	if l.data != nil {
		l.data.Close()
		l.journal.Close()
	}
	if f := l.direct.Swap(nil); f != nil {
		f.Close()
	}
}

func removeLayerFiles(dir string, num uint32) error {
	dp, jp := layerPaths(dir, num)
	for _, p := range []string{dp, jp} {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			return ioErr(err)
		}
	}
	return nil
}

// canonical follows merges to the layer whose data file now holds l's blocks.
func (l *layer) canonical() *layer {
	for {
		next := l.mergedInto.Load()
		if next == nil {
			return l
		}
		l = next
	}
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return ioErr(err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return ioErr(err)
	}
	return nil
}

// ioErr wraps a system error, mapping ENOSPC and EDQUOT to ErrNoSpace.
func ioErr(err error) error {
	if errors.Is(err, unix.ENOSPC) || errors.Is(err, unix.EDQUOT) {
		return fmt.Errorf("%w: %v", ErrNoSpace, err)
	}
	return err
}
