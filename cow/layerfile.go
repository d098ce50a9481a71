package cow

import (
	"errors"
	"fmt"
	"os"
	"sort"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/cow/internal/faultfs"
	"github.com/cowcsi/cowcsi/cow/internal/ondisk"
)

// A layer's data file: creating it, writing it, growing it and giving
// back the space its blocks no longer use.

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
	j, err := openFile(l.ff, jp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return ioErr(err)
	}
	img := append(ondisk.EncodeJournalHeader(ondisk.JournalHeader{Layer: l.num}),
		make([]byte, 4096-ondisk.JournalHeaderSize)...)
	if _, err := l.ff.WriteAt(j, img, 0); err != nil {
		j.Close()
		return l.dropFiles(dir, err)
	}
	data, err := openData(l.ff, dp, os.O_RDWR|os.O_CREATE|os.O_TRUNC)
	if err != nil {
		j.Close()
		return l.dropFiles(dir, err)
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

// dropFiles removes what a failed ensureFiles created (a layer without
// files is one that never owned a block), and returns err as ensureFiles
// reports it. What it cannot remove, open removes.
func (l *layer) dropFiles(dir string, err error) error {
	_ = removeLayerFiles(l.ff, dir, l.num)
	return ioErr(err)
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
func openData(ff *faultfs.FS, path string, flag int) (*os.File, error) {
	f, err := openFile(ff, path, flag|unix.O_NOATIME, 0o600)
	if errors.Is(err, os.ErrPermission) {
		f, err = openFile(ff, path, flag, 0o600)
	}
	return f, err
}

// adviseRandom turns readahead off for a layer data file (see writePiece).
// It is advice: a filesystem that ignores it costs speed, not correctness.
func adviseRandom(f *os.File) {
	_ = unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_RANDOM)
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
		if _, err := l.ff.WriteAt(l.data, p[:n], off); err != nil {
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
		l.ioMu.RLock()
		if !l.closed {
			_ = unix.SyncFileRange(int(l.data.Fd()), start, length, unix.SYNC_FILE_RANGE_WRITE)
		}
		l.ioMu.RUnlock()
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
	n, err := l.ff.WriteAt(f, p, off)
	if errors.Is(err, unix.EINVAL) && n == 0 {
		// Refused after all (a filesystem whose rules statx does not
		// tell): buffered from now on.
		l.directState.Store(directOff)
		return false, nil
	}
	return true, ioErr(err)
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
	f, err := openData(l.ff, fmt.Sprintf("/proc/self/fd/%d", l.data.Fd()), os.O_RDWR|unix.O_DIRECT)
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

// reclaim frees the space of a data file that no location uses:
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
	if err := l.ff.Truncate(l.data, int64(at)<<blockShift); err != nil {
		return ioErr(err)
	}
	l.next.Store(at)
	l.fileEnd.Store(at)
	return nil
}

// punch frees n file blocks from file block fb of a layer's data file.
func (l *layer) punch(fb, n uint64) error {
	return l.punchBytes(int64(fb)<<blockShift, int64(n)<<blockShift)
}

// punchBytes frees n bytes from off of a layer's data file, while the file
// is open: under ioMu, so that close cannot give its descriptor number to
// another file in between. The caller holds no ranked lock.
func (l *layer) punchBytes(off, n int64) error {
	l.ioMu.RLock()
	defer l.ioMu.RUnlock()
	if l.closed {
		return errf(ErrClosed, "layer %d", l.num)
	}
	return ioErr(l.ff.Punch(l.data, off, n))
}

// growStep is how far ahead of its appends a data file grows.
const growStep = (64 << 20) >> blockShift

// alloc reserves n file blocks at the end of a layer's data file and
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
		if err := l.ff.Truncate(l.data, int64(size)<<blockShift); err != nil {
			// Give the blocks back unless a later reservation took
			// blocks after them (reclaim frees those at the next open).
			l.next.CompareAndSwap(end, first)
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
