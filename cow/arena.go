package cow

import (
	"errors"
	"fmt"
	"math/bits"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Location extents of fragmented leaves, in a file the kernel can page.
//
// A layer written in random 4 KiB blocks holds one 8-byte locExt per
// block (locs.go). Held on the Go heap, that is memory the kernel can never
// take back: 2.25 GiB per TiB written that way, and on a node without swap
// (the Kubernetes default) a driver's heap grows with what its volumes were
// written like. A leaf whose extents outgrow arenaMinExts keeps them in a
// locArena instead: slots of a shared mapping of an unlinked file in the
// store's layers directory. Its pages are page cache: the kernel writes
// them back to that file and drops them under memory pressure (a cgroup's
// limit included), and reads them back on the next fault, as it does for
// any file-backed mapping. Without pressure they stay resident, so reads
// and writes of the extents cost what they cost on the heap.
//
// The file is scratch: the journal stays the record of where blocks are,
// and each open rebuilds the extents from it, so the file needs no format,
// no sync and no recovery; it disappears with the store's process. Its
// space is reserved with fallocate before a segment is mapped, so a full
// disk shows as a failed reservation (leaves then stay on the heap), never
// as a fault on a page that has no block behind it. A read error on a
// page that was written back and dropped faults the process (SIGBUS), as
// it would for a binary's own pages on a failing disk. A page that turns
// dirty again after writeback goes through the kernel's dirty throttling
// in the fault, under the layer's treeMu; the data writes around it are
// throttled the same way, and a page turns dirty once per writeback cycle.

const (
	// arenaMinExts: leaves with more extents than this (512 bytes) move
	// to the arena; smaller ones stay on the heap, where a few extents a
	// leaf (writes in runs) cost less than a slot.
	arenaMinExts = 64
	// Slot classes hold arenaMinExts<<k extents, up to a whole leaf of
	// one-block extents (leafBlocks, 64 KiB).
	arenaClasses = 8
	// Segments grow from 4 MiB to 64 MiB: a store whose leaves are never
	// fragmented reserves nothing, one with a few reserves little.
	arenaFirstSeg = 4 << 20
	arenaMaxSeg   = 64 << 20
)

// Every class is a power of two up to a whole leaf.
var _ [leafBlocks - arenaMinExts<<(arenaClasses-1)]struct{}
var _ [arenaMinExts<<(arenaClasses-1) - leafBlocks]struct{}

// arenaClass returns the smallest class holding n extents (n at most
// leafBlocks).
func arenaClass(n int) int {
	if n <= arenaMinExts {
		return 0
	}
	return bits.Len(uint((n - 1) / arenaMinExts))
}

func classExts(c int) int { return arenaMinExts << c }

// arenaSlot names a slot: its segment in the high bits, its offset in the
// segment in units of the smallest slot (512 bytes) in the low ones. Four
// bytes, as it sits in every arena leaf's entry.
type arenaSlot uint32

const (
	slotUnit     = arenaMinExts * int(unsafe.Sizeof(locExt{}))
	slotOffBits  = 17 // arenaMaxSeg / slotUnit
	arenaMaxSegs = 1 << (32 - slotOffBits)
)

var _ [arenaMaxSeg/slotUnit - 1<<slotOffBits]struct{}
var _ [1<<slotOffBits - arenaMaxSeg/slotUnit]struct{}

func makeSlot(seg, off int) arenaSlot { return arenaSlot(seg<<slotOffBits | off/slotUnit) }
func (s arenaSlot) seg() int          { return int(s >> slotOffBits) }
func (s arenaSlot) off() int          { return int(s&(1<<slotOffBits-1)) * slotUnit }

// locArena hands out slots of a file-backed shared mapping. Its methods
// are safe for concurrent use; the extents in a slot are guarded by the
// lock of the locMap that holds the slot (a layer's treeMu).
type locArena struct {
	mu     rankedMutex[arenaRank]
	fd     int
	segs   [][]byte
	used   int // bytes handed out of the last segment, by bump
	free   [arenaClasses][]arenaSlot
	inUse  int64 // bytes in slots handed out
	broken bool  // a segment could not be reserved or mapped: heap only
	closed bool
}

// newLocArena makes an arena whose file is an unlinked file in dir. It
// returns nil (leaves stay on the heap) if the filesystem cannot make one.
func newLocArena(dir string) *locArena {
	fd, err := unix.Open(dir, unix.O_TMPFILE|unix.O_RDWR|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil
	}
	return &locArena{fd: fd}
}

// alloc returns a slot of class c and its extents (length 0, capacity
// classExts(c)); ok is false if the arena cannot grow (the caller keeps
// the extents on the heap).
func (a *locArena) alloc(c int) (arenaSlot, []locExt, bool) {
	if a == nil {
		return 0, nil, false
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return 0, nil, false
	}
	size := classExts(c) * int(unsafe.Sizeof(locExt{}))
	var s arenaSlot
	if n := len(a.free[c]); n > 0 {
		s = a.free[c][n-1]
		a.free[c] = a.free[c][:n-1]
	} else {
		if len(a.segs) == 0 || a.used+size > len(a.segs[len(a.segs)-1]) {
			if a.broken || a.grow() != nil {
				// Not retried: the heap takes leaves from now on.
				a.broken = true
				return 0, nil, false
			}
		}
		s = makeSlot(len(a.segs)-1, a.used)
		a.used += size
	}
	a.inUse += int64(size)
	return s, a.exts(s, c), true
}

// exts returns slot s of class c as an empty slice of its capacity.
func (a *locArena) exts(s arenaSlot, c int) []locExt {
	p := unsafe.Pointer(&a.segs[s.seg()][s.off()])
	return unsafe.Slice((*locExt)(p), classExts(c))[:0]
}

// grow reserves and maps the next segment; what is left of the current
// one goes unused (its slots are smaller than the segment, so little).
func (a *locArena) grow() error {
	if len(a.segs) == arenaMaxSegs {
		return errors.New("location arena: segments exhausted")
	}
	var off int64
	size := arenaFirstSeg
	for _, seg := range a.segs {
		off += int64(len(seg))
		size = min(2*len(seg), arenaMaxSeg)
	}
	if err := unix.Fallocate(a.fd, 0, off, int64(size)); err != nil {
		return err
	}
	b, err := unix.Mmap(a.fd, off, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return err
	}
	// No readahead on faults: slots are touched one by one, and readahead
	// fills the page cache with the zeros of whole segments around them
	// (TestArenaPagedOut; docs/DECISIONS.md, "Arena mappings without
	// readahead").
	if err := unix.Madvise(b, unix.MADV_RANDOM); err != nil {
		unix.Munmap(b)
		return err
	}
	a.segs = append(a.segs, b)
	a.used = 0
	return nil
}

// release gives slot s of class c back; its extents must not be used
// after.
func (a *locArena) release(s arenaSlot, c int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.free[c] = append(a.free[c], s)
	a.inUse -= int64(classExts(c) * int(unsafe.Sizeof(locExt{})))
}

// bytes returns the bytes in slots handed out.
func (a *locArena) bytes() int64 {
	if a == nil {
		return 0
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.inUse
}

// close unmaps the arena and closes its file (which the kernel then
// frees). Every slot must have been released: the store closes its layers
// first. Later allocs fail.
func (a *locArena) close() error {
	if a == nil {
		return nil
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return nil
	}
	a.closed = true
	if a.inUse != 0 {
		// A layer still holds slots: leave the mapping (its extents stay
		// readable) and say so, rather than fault on its next read.
		unix.Close(a.fd)
		return fmt.Errorf("cow: location arena closed with %d bytes of slots in use", a.inUse)
	}
	var errs []error
	for _, seg := range a.segs {
		errs = append(errs, unix.Munmap(seg))
	}
	a.segs = nil
	errs = append(errs, unix.Close(a.fd))
	if err := errors.Join(errs...); err != nil {
		return &os.PathError{Op: "close", Path: "location arena", Err: err}
	}
	return nil
}
