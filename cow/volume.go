package cow

import (
	"context"
	"io"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/cow/internal/ondisk"
)

// stripeBlocks blocks share one copy-up lock; stripes locks per volume.
const (
	stripeShift = 4
	stripes     = 64
)

// volume is the engine's state of one volume, open or not.
type volume struct {
	id   string
	s    *Store
	head atomic.Pointer[layer]
	size atomic.Int64

	// barrier: I/O that changes the head holds it shared; snapshot, clone
	// and expand hold it exclusively, so they see no write half done.
	barrier sync.RWMutex
	// stripe locks serialize writes that make a block owned by the head
	// (copy-up, discard), so two of them cannot interleave on one block.
	stripe [stripes]sync.Mutex

	handle *Volume // guarded by Store.topo
}

// Volume is an open volume: the block device the node exports. It is safe for
// concurrent use by any number of goroutines.
type Volume struct {
	v      *volume
	closed atomic.Bool
}

// OpenVolume opens a volume for I/O. A volume has at most one handle.
func (s *Store) OpenVolume(ctx context.Context, id string) (*Volume, error) {
	s.topo.Lock()
	defer s.topo.Unlock()
	v, err := s.lookupVolume(id)
	if err != nil {
		return nil, err
	}
	if v.handle != nil {
		return nil, errf(ErrInUse, "volume %s is already open", id)
	}
	v.handle = &Volume{v: v}
	return v.handle, nil
}

// ID is the volume's ID.
func (h *Volume) ID() string { return h.v.id }

// Size is the volume's current size in bytes.
func (h *Volume) Size() int64 { return h.v.size.Load() }

func (h *Volume) check() error {
	if h.closed.Load() {
		return errf(ErrClosed, "volume %s", h.v.id)
	}
	return nil
}

// Close flushes the volume and releases the handle.
func (h *Volume) Close() error {
	if h.closed.Swap(true) {
		return nil
	}
	s := h.v.s
	s.topo.Lock()
	defer s.topo.Unlock()
	if h.v.handle == h {
		h.v.handle = nil
	}
	if s.closed.Load() {
		return nil // Store.Close flushed it
	}
	h.v.barrier.RLock()
	defer h.v.barrier.RUnlock()
	return h.v.head.Load().flush(s.layerFS)
}

// ReadAt reads from the volume's view: for each block, the newest layer of
// its chain that owns it, or zeros.
func (h *Volume) ReadAt(p []byte, off int64) (int, error) { return h.readAt(p, off, false) }

// ReadAtNoWait is ReadAt, but it fails with an error wrapping
// syscall.EAGAIN, having read nothing useful, when the data is not in
// memory (a layer file's page cache) or the volume's write barrier is
// wanted (a snapshot, clone or expansion waits for it): the caller can then
// do the read where blocking costs nothing (the FUSE ring answers such
// reads off its thread).
func (h *Volume) ReadAtNoWait(p []byte, off int64) (int, error) { return h.readAt(p, off, true) }

func (h *Volume) readAt(p []byte, off int64, nowait bool) (int, error) {
	n, eof, err := h.clip(p, off)
	if err != nil {
		return 0, err
	}
	if err := h.v.read(p[:n], off, nowait); err != nil {
		return 0, err
	}
	if eof {
		return n, io.EOF
	}
	return n, nil
}

// clip checks a read of p at off and returns how many bytes of it are
// inside the volume; eof when that is fewer than len(p). A read at or past
// the end is io.EOF.
func (h *Volume) clip(p []byte, off int64) (n int, eof bool, err error) {
	if err := h.check(); err != nil {
		return 0, false, err
	}
	if off < 0 {
		return 0, false, errf(ErrInvalid, "negative offset %d", off)
	}
	size := h.v.size.Load()
	if off >= size {
		return 0, false, io.EOF
	}
	if int64(len(p)) > size-off {
		return int(size - off), true, nil
	}
	return len(p), false, nil
}

func (v *volume) read(p []byte, off int64, nowait bool) error {
	// The barrier keeps the head this read resolves through the head until
	// the read is done: without it, a read that loaded the head before a
	// snapshot could still be walking that layer's tree when the snapshot
	// is deleted and the background merge removes the layer (a race the
	// race detector found under FUSE over io_uring). A nowait read does not
	// wait for it either: its caller may be the thread that completes the
	// planned writes (PlanWrite) a snapshot waiting for the barrier waits
	// for.
	if !nowait {
		v.barrier.RLock()
	} else if !v.barrier.TryRLock() {
		return unix.EAGAIN
	}
	defer v.barrier.RUnlock()
	return v.resolveRuns(p, off, func(owner uint32, q []byte, at int64) error {
		return v.s.readOwner(owner, q, at, nowait)
	})
}

// resolveRuns splits a read of p at off into runs of blocks with one owner
// each (0: zeros) and calls fn for each, in order. The caller holds the
// barrier shared. Owners are resolved under the head's tree lock, fn runs
// without it: a write racing with the read may land before or after, as on
// any disk.
func (v *volume) resolveRuns(p []byte, off int64, fn func(owner uint32, q []byte, at int64) error) error {
	head := v.head.Load()
	type run struct {
		owner    uint32
		from, to int // byte range of p
	}
	var runsBuf [8]run
	runs := runsBuf[:0]
	head.treeMu.RLock()
	end := off + int64(len(p))
	for pos := off; pos < end; {
		b := uint64(pos >> blockShift)
		lf := head.tree.leafAt(b)
		// Walk the blocks of this leaf in one go.
		leafEnd := int64((b|(leafBlocks-1))+1) << blockShift
		if leafEnd > end {
			leafEnd = end
		}
		for pos < leafEnd {
			var owner uint32
			if lf != nil {
				owner = lf.get(uint64(pos>>blockShift) & (leafBlocks - 1))
			}
			next := (pos | (BlockSize - 1)) + 1
			if next > leafEnd {
				next = leafEnd
			}
			from, to := int(pos-off), int(next-off)
			if k := len(runs); k > 0 && runs[k-1].owner == owner && runs[k-1].to == from {
				runs[k-1].to = to
			} else {
				runs = append(runs, run{owner, from, to})
			}
			pos = next
		}
	}
	head.treeMu.RUnlock()
	for _, r := range runs {
		if err := fn(r.owner, p[r.from:r.to], off+int64(r.from)); err != nil {
			return err
		}
	}
	return nil
}

// readOwner reads p at off from the data file of the layer a tree entry
// names. With nowait it fails (EAGAIN) rather than wait for the disk, and
// starts no read; what it reads from disk it leaves out of the page cache
// (uncachedFile).
func (s *Store) readOwner(owner uint32, p []byte, off int64, nowait bool) error {
	if owner == 0 {
		clear(p)
		return nil
	}
	l, err := s.lockOwner(owner, off)
	if err != nil {
		return err
	}
	defer l.ioMu.RUnlock()
	var buf [4]piece
	ps, err := l.where(buf[:0], off, len(p))
	if err != nil {
		return err
	}
	if nowait {
		for i, q := 0, p; i < len(ps); q, i = q[ps[i].n:], i+1 {
			if !ps[i].zero && !l.cached(q[:ps[i].n], ps[i].off) {
				// A RWF_NOWAIT read that fails with EAGAIN has already
				// started reading the pages in, on this thread; the read
				// that follows goes past the page cache and would read
				// them a second time.
				return unix.EAGAIN
			}
		}
	}
	for _, pc := range ps {
		q := p[:pc.n]
		p = p[pc.n:]
		if pc.zero {
			clear(q)
			continue
		}
		if nowait {
			// All in memory: the flag leaves cached pages cached, and
			// covers pages evicted since the check.
			n, err := unix.Preadv2(int(l.data.Fd()), [][]byte{q}, pc.off, unix.RWF_NOWAIT|l.dontcache)
			if err == nil && n < len(q) {
				// Partly in memory, or the end of a shorter layer's file:
				// the blocking read tells them apart.
				err = unix.EAGAIN
			}
			if err != nil {
				return err
			}
			continue
		}
		fd, flags := l.uncachedFile(q, pc.off)
		n, err := unix.Preadv2(fd, [][]byte{q}, pc.off, flags)
		if err != nil {
			return err
		}
		if n < len(q) {
			clear(q[n:]) // past the end of a shorter (older) layer's file
		}
	}
	return nil
}

// lockOwner returns the layer whose data file holds the blocks a tree entry
// names (owner, not 0), with its ioMu held shared: the file stays open until
// the caller's RUnlock.
func (s *Store) lockOwner(owner uint32, off int64) (*layer, error) {
	for {
		l := s.resolve(owner)
		if l == nil {
			return nil, errf(ErrCorrupt, "block at %d owned by unknown layer %d", off, owner)
		}
		l.ioMu.RLock()
		if !l.closed {
			return l, nil
		}
		// Merged away between resolve and lock: resolve again.
		l.ioMu.RUnlock()
		if l.mergedInto.Load() == nil {
			return nil, errf(ErrClosed, "layer %d", l.num)
		}
	}
}

// WriteAt writes p at off. Blocks the head already owns are written in place;
// a partial write to a block it does not own first copies the rest of that
// block up from the layer below.
func (h *Volume) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > h.v.size.Load() {
		return 0, errf(ErrInvalid, "write of %d bytes at %d outside volume of %d bytes", len(p), off, h.v.size.Load())
	}
	if len(p) == 0 {
		return 0, nil
	}
	v := h.v
	v.barrier.RLock()
	defer v.barrier.RUnlock()
	// Under the barrier: the store's Close closes the handle under it
	// before it closes the layers.
	if err := h.check(); err != nil {
		return 0, err
	}
	head := v.head.Load()
	if err := head.broken(); err != nil {
		return 0, err
	}
	first, last := uint64(off>>blockShift), uint64((off+int64(len(p))-1)>>blockShift)
	if head.placedAll(first, last) {
		if err := head.writePlaced(p, off); err != nil {
			return 0, err
		}
		head.dirty.Store(true)
		return len(p), nil
	}
	if err := head.ensureFiles(v.s.layerFS); err != nil {
		return 0, err
	}
	unlock := v.lockStripes(first, last)
	defer unlock()
	if err := v.writeAppending(head, p, off, first, last); err != nil {
		return 0, err
	}
	return len(p), nil
}

// blockRun is a run of blocks of a head, with data places already
// (placed) or without.
type blockRun struct {
	start, count uint64
	placed       bool
}

// placedRuns splits blocks [first, last] of a head into runs with
// and without data places.
func (l *layer) placedRuns(first, last uint64) []blockRun {
	var runs []blockRun
	l.treeMu.RLock()
	defer l.treeMu.RUnlock()
	for b := first; b <= last; {
		loc, n, ok := l.locs.get(b)
		placed := ok && loc != ondisk.LocZero
		n = min(n, last+1-b)
		if k := len(runs); k > 0 && runs[k-1].placed == placed {
			runs[k-1].count += n
		} else {
			runs = append(runs, blockRun{b, n, placed})
		}
		b += n
	}
	return runs
}

// writeAppending is the slow write path, under the stripe locks of its
// blocks: blocks with a data place are written in place, the others
// appended to the data file (a partial edge block whole, its old content
// copied up from the view), then given their places.
func (v *volume) writeAppending(head *layer, p []byte, off int64, first, last uint64) error {
	end := off + int64(len(p))
	runs := head.placedRuns(first, last)
	var need uint64
	for _, r := range runs {
		if !r.placed {
			need += r.count
		}
	}
	loc, err := head.alloc(need)
	if err != nil {
		return err
	}
	var recs []ondisk.Range
	var used uint64 // of the need blocks from loc
	fail := func(err error) error {
		head.unreserve([]ondisk.Range{{Count: need, Loc: loc}})
		return err
	}
	for _, r := range runs {
		rOff, rEnd := int64(r.start)<<blockShift, int64(r.start+r.count)<<blockShift
		from, to := max(off, rOff), min(end, rEnd)
		if r.placed {
			if err := head.writePlaced(p[from-off:to-off], from); err != nil {
				return fail(err)
			}
			continue
		}
		q := p[from-off : to-off]
		if from != rOff || to != rEnd {
			// Partial edge blocks: write them whole.
			blk := make([]byte, rEnd-rOff)
			if from != rOff {
				if err := v.readBlock(head, r.start, blk[:BlockSize]); err != nil {
					return fail(err)
				}
			}
			if to != rEnd && (r.count > 1 || from == rOff) {
				if err := v.readBlock(head, r.start+r.count-1, blk[len(blk)-BlockSize:]); err != nil {
					return fail(err)
				}
			}
			copy(blk[from-rOff:], q)
			q = blk
		}
		at := loc + used
		used += r.count
		if err := head.writeData(q, int64(at)<<blockShift); err != nil {
			return fail(err)
		}
		recs = append(recs, ondisk.Range{Start: r.start, Count: r.count, Loc: at})
	}
	head.dirty.Store(true)
	head.place(recs)
	return nil
}

// readBlock reads block b of the view of head into dst (one block).
func (v *volume) readBlock(head *layer, b uint64, dst []byte) error {
	head.treeMu.RLock()
	owner := head.tree.get(b)
	head.treeMu.RUnlock()
	return v.s.readOwner(owner, dst, int64(b)<<blockShift, false)
}

func (v *volume) lockStripes(first, last uint64) func() {
	var held [stripes]bool
	if last-first >= stripes<<stripeShift {
		for i := range held {
			held[i] = true
		}
	} else {
		for b := first >> stripeShift; b <= last>>stripeShift; b++ {
			held[b%stripes] = true
		}
	}
	for i := range held {
		if held[i] {
			v.stripe[i].Lock()
		}
	}
	return func() {
		for i := range held {
			if held[i] {
				v.stripe[i].Unlock()
			}
		}
	}
}

// Flush makes every write that returned before the call durable.
func (h *Volume) Flush() error {
	if err := h.check(); err != nil {
		return err
	}
	h.v.barrier.RLock()
	defer h.v.barrier.RUnlock()
	if err := h.check(); err != nil { // see WriteAt
		return err
	}
	return h.v.head.Load().flush(h.v.s.layerFS)
}

// Discard makes a range read back as zeros. Whole blocks become holes in the
// head's data file, owned by the head so no older data shows through; partial
// blocks at the edges are written with zeros.
func (h *Volume) Discard(off, length int64) error {
	if err := h.check(); err != nil {
		return err
	}
	if off < 0 || length < 0 || off+length > h.v.size.Load() {
		return errf(ErrInvalid, "discard of %d bytes at %d outside volume of %d bytes", length, off, h.v.size.Load())
	}
	if length == 0 {
		return nil
	}
	end := off + length
	alignedStart := roundUp(off)
	alignedEnd := end &^ (BlockSize - 1)
	if alignedStart >= alignedEnd {
		_, err := h.WriteAt(make([]byte, length), off)
		return err
	}
	if off < alignedStart {
		if _, err := h.WriteAt(make([]byte, alignedStart-off), off); err != nil {
			return err
		}
	}
	if end > alignedEnd {
		if _, err := h.WriteAt(make([]byte, end-alignedEnd), alignedEnd); err != nil {
			return err
		}
	}
	v := h.v
	v.barrier.RLock()
	defer v.barrier.RUnlock()
	if err := h.check(); err != nil { // see WriteAt
		return err
	}
	head := v.head.Load()
	if err := head.broken(); err != nil {
		return err
	}
	first, last := uint64(alignedStart>>blockShift), uint64((alignedEnd-1)>>blockShift)
	if err := head.ensureFiles(v.s.layerFS); err != nil {
		return err
	}
	unlock := v.lockStripes(first, last)
	defer unlock()
	return head.discardDense(first, last)
}

// discardDense makes blocks [first, last] of a head read as zeros:
// blocks with data places become holes there, the others are owned as
// zeros (no data, no file space). The caller holds their stripe locks.
func (l *layer) discardDense(first, last uint64) error {
	var recs []ondisk.Range
	for _, r := range l.placedRuns(first, last) {
		if !r.placed {
			recs = append(recs, ondisk.Range{Start: r.start, Count: r.count, Loc: ondisk.LocZero})
			continue
		}
		var buf [4]piece
		ps, err := l.where(buf[:0], int64(r.start)<<blockShift, int(r.count)<<blockShift)
		if err != nil {
			return err
		}
		for _, pc := range ps {
			if err := l.punchBytes(pc.off, int64(pc.n)); err != nil {
				return err
			}
		}
	}
	l.dirty.Store(true)
	l.place(recs)
	return nil
}

// WriteZeroes makes a range read back as zeros; same as Discard.
func (h *Volume) WriteZeroes(off, length int64) error { return h.Discard(off, length) }
