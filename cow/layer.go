package cow

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/cow/internal/faultfs"
	"github.com/cowcsi/cowcsi/cow/internal/ondisk"
)

// layer is one data file plus the journal of which blocks it owns. A head
// layer takes writes; a frozen layer never changes its view again (a merge
// may copy blocks into it that its view already showed). Its state is
// grouped by what guards it; lockrank.go gives the order of the locks.
type layer struct {
	num    uint32
	ff     *faultfs.FS // the store's file I/O (nil: plain)
	parent *layer      // nil for a base layer; guarded by Store.topo
	frozen bool        // guarded by Store.topo
	size   atomic.Int64
	// mergedInto is set when this layer's blocks were merged into its child:
	// tree entries naming this layer now resolve to that child's data file.
	mergedInto atomic.Pointer[layer]
	aliases    []uint32 // layers merged into this one; guarded by Store.topo
	// stale: layers merged into this one that no index names any more
	// (adopt or relabelAliases renamed their blocks), but a read in flight
	// of a volume above may still resolve them: their slots go when those
	// volumes' barriers are next held (dropStale). Guarded by topo.
	stale []uint32

	layerLife
	layerFiles
	layerSpace
	layerIndex
	layerJournal
	writeState
	cacheState
}

// layerLife is the lifetime of the layer's data files.
type layerLife struct {
	// ioMu: readers hold it shared around pread, removal takes it
	// exclusively before closing.
	ioMu   rankedRWMutex[ioRank]
	closed bool // guarded by ioMu
	// pins counts read and write plans (Volume.PlanRead, PlanWrite) that
	// will still use the data files; close waits for them.
	pins sync.WaitGroup
}

// layerFiles is the layer's data file (layerfile.go). The data and journal
// files are created on first use (ensureFiles), not with the layer: a file
// creation in the same ext4 journal commit as the catalog's fdatasync would
// make CreateSnapshot wait for it (docs/DECISIONS.md, "Snapshot cost: one
// catalog fdatasync"). Only a layer that owns blocks needs files, and
// owning a block requires them first.
type layerFiles struct {
	// filesMu guards the creation of data and of the journal, and the
	// opening of direct. data and dontcache do not change once set.
	filesMu rankedMutex[filesRank]
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
}

// layerSpace is the space of the data file: next is its next free file
// block, fileEnd its size in blocks, grown ahead of the appends (alloc,
// under growMu) so that writes never extend the file.
type layerSpace struct {
	growMu  rankedMutex[growRank]
	next    atomic.Uint64
	fileEnd atomic.Uint64
}

// layerIndex is where the layer's blocks are (layerindex.go), guarded by
// treeMu: the index of its view (only a head's tree is ever changed), the
// data file locations of the blocks it owns (locs.go), and the records of
// the blocks it came to own since the last flush.
type layerIndex struct {
	treeMu  rankedRWMutex[treeRank]
	tree    tree
	locs    locMap
	pending []ondisk.Range // owned since the last flush, not yet in the journal
	owned   atomic.Int64   // blocks this layer owns (journal plus pending)
}

// layerJournal is the journal file and where its next record goes
// (layerjournal.go), guarded by flushMu, which serializes journal appends
// and flushes.
type layerJournal struct {
	flushMu   rankedMutex[flushRank]
	journal   *os.File
	jOff      int64 // where the next record goes
	jAlloc    int64 // end of the zero-filled, written region
	dirSynced bool  // the layers directory was fsynced since the files were created
}

// writeState is what writes left for a flush to do, in atomics.
type writeState struct {
	dirty atomic.Bool // data written since the last fdatasync
	// syncErr is the first failed fdatasync of the layer's files (or of
	// their directory). Linux reports a writeback error once and marks
	// the pages clean, so a later fdatasync would succeed over data that
	// never reached the disk: from then on the layer takes no writes and
	// every flush fails, until the store is reopened from what is on disk.
	syncErr atomic.Pointer[error]
	// unsynced counts bytes written through the page cache since
	// writeback was last started (writeBehind); kicking is set while a
	// goroutine starts it.
	unsynced atomic.Int64
	kicking  atomic.Bool
}

// cacheState is what the cache policy (layercache.go) knows of the data
// file's pages in the page cache, in atomics. mayCache is false only when
// the data file is known to have no pages in the page cache: a read
// without waiting then skips cachestat (cached). misses counts cachestat
// misses since the last check, recheckAt how many make the next one
// (recheckCache).
type cacheState struct {
	mayCache  atomic.Bool
	misses    atomic.Uint32
	recheckAt atomic.Uint32
	checking  atomic.Bool // a recheckCache goroutine runs
}

func layerPaths(dir string, num uint32) (data, journal string) {
	base := filepath.Join(dir, fmt.Sprintf("%08x", num))
	return base + ".data", base + ".map"
}

func newLayerStruct(num uint32, size int64, arena *locArena, ff *faultfs.FS) *layer {
	l := &layer{num: num, ff: ff}
	l.locs.arena = arena
	l.size.Store(size)
	return l
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

func removeLayerFiles(ff *faultfs.FS, dir string, num uint32) error {
	dp, jp := layerPaths(dir, num)
	for _, p := range []string{dp, jp} {
		if err := ff.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
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

func syncDir(ff *faultfs.FS, dir string) error {
	return ioErr(ff.SyncDir(dir))
}

// openFile opens path as os.OpenFile does, through ff.
func openFile(ff *faultfs.FS, path string, flag int, perm os.FileMode) (*os.File, error) {
	f, err := os.OpenFile(path, flag, perm)
	if err != nil {
		return nil, err
	}
	if err := ff.Opened(path, f, flag); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// appendLog writes buf at off in the log file f. When buf would pass the
// zero-filled space kept ahead (*alloc), that space is first extended by a
// multiple of step.
func appendLog(ff *faultfs.FS, f *os.File, buf []byte, off int64, alloc *int64, step int64) error {
	if end := off + int64(len(buf)); end > *alloc {
		grow := (end - *alloc + step - 1) / step * step
		if _, err := ff.WriteAt(f, make([]byte, grow), *alloc); err != nil {
			return ioErr(err)
		}
		*alloc += grow
	}
	if _, err := ff.WriteAt(f, buf, off); err != nil {
		return ioErr(err)
	}
	return nil
}

// zeroLogTail overwrites with zeros whatever follows off in the log file f,
// whose whole content is img, and syncs it, unless it is all zeros already:
// nothing after a log's last valid record may ever read as one, even once
// later appends fill a gap in front of it.
func zeroLogTail(ff *faultfs.FS, f *os.File, img []byte, off int64) error {
	if off >= int64(len(img)) || allZeroBytes(img[off:]) {
		return nil
	}
	if _, err := ff.WriteAt(f, make([]byte, int64(len(img))-off), off); err != nil {
		return ioErr(err)
	}
	return ioErr(ff.Fdatasync(f))
}

// failSync records that an fdatasync of the layer's files failed with err
// (see syncErr) and returns err as the caller should report it.
func (l *layer) failSync(err error) error {
	err = ioErr(err)
	l.syncErr.CompareAndSwap(nil, &err)
	return err
}

// broken returns an error wrapping EIO if an fdatasync of the layer's
// files failed (syncErr), else nil.
func (l *layer) broken() error {
	if p := l.syncErr.Load(); p != nil {
		return l.brokenErr(*p)
	}
	return nil
}

func (l *layer) brokenErr(first error) error {
	return fmt.Errorf("%w: layer %d: an earlier fdatasync failed (%v): writes and flushes fail until the store is reopened",
		syscall.EIO, l.num, first)
}

// ioErr wraps a system error, mapping ENOSPC and EDQUOT to ErrNoSpace.
func ioErr(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, unix.ENOSPC) || errors.Is(err, unix.EDQUOT) {
		return fmt.Errorf("%w: %v", ErrNoSpace, err)
	}
	return err
}
