package cow

import (
	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/cow/internal/blockio"
)

// PlanRead resolves a read of p at off like ReadAt, fills the parts that
// read as zeros, and returns what to read from which layer file into the
// rest of p, for a caller that does the reads itself (the FUSE ring submits
// them to io_uring, so a read from disk occupies no thread). The layer files
// stay open until the plan's Release. The view is the volume's at the time
// of the call; writes after it may or may not show, as with any read that
// races a write. Like ReadAtNoWait it does not wait for the volume's write
// barrier: while a snapshot, clone or expansion waits for it, PlanRead
// fails with an error wrapping syscall.EAGAIN and the caller reads with
// ReadAt where waiting costs nothing.
func (h *Volume) PlanRead(p []byte, off int64) (*blockio.Plan, error) {
	n, eof, err := h.clip(p, off)
	if err != nil {
		return nil, err
	}
	pl := &blockio.Plan{N: n, EOF: eof}
	var pinned []*layer
	release := func() {
		for _, l := range pinned {
			l.pins.Done()
		}
	}
	v := h.v
	if !v.barrier.TryRLock() {
		return nil, unix.EAGAIN
	}
	err = v.resolveRuns(p[:pl.N], off, func(owner uint32, q []byte, at int64) error {
		if owner == 0 {
			clear(q)
			return nil
		}
		l, err := v.s.lockOwner(owner, at)
		if err != nil {
			return err
		}
		var buf [4]piece
		ps, err := l.where(buf[:0], at, len(q))
		if err != nil {
			l.ioMu.RUnlock()
			return err
		}
		// A pin keeps the file open after the lock is gone; a merge
		// leaves the blocks in place until it closes the file.
		l.pins.Add(1)
		for _, pc := range ps {
			if pc.zero {
				clear(q[:pc.n])
			} else {
				seg := blockio.Seg{Off: pc.off, Buf: q[:pc.n]}
				seg.Fd, seg.Flags = l.uncachedFile(seg.Buf, pc.off)
				pl.Segs = append(pl.Segs, seg)
			}
			q = q[pc.n:]
		}
		l.ioMu.RUnlock()
		pinned = append(pinned, l)
		return nil
	})
	v.barrier.RUnlock()
	if err != nil {
		release()
		return nil, err
	}
	pl.Release = release
	return pl, nil
}

// PlanWrite resolves a large write of p at off for a caller that submits
// it itself: the FUSE ring hands it to io_uring, so the write occupies no
// thread while the disk works, and it goes past the page cache, as WriteAt
// writes it too (directWrite). Only writes of directWrite bytes or more to
// blocks the head owns already are planned, and only where O_DIRECT takes
// the buffer, offset and length (the ring's buffers are page aligned, a
// loop device's requests are whole sectors); for any other write it
// returns a nil plan and nil error, and the caller writes with WriteAt
// (copy-up and ownership records stay there). Small writes stay buffered:
// planned, they cost more CPU per I/O and ran no faster (docs/DECISIONS.md,
// "Large writes to owned blocks through the FUSE ring").
//
// It does not wait for the volume's write barrier: while a snapshot, clone
// or expansion waits for it, it fails with an error wrapping
// syscall.EAGAIN, and the caller writes with WriteAt where waiting costs
// nothing. A plan holds the barrier shared until its Release, so that a
// snapshot waits for the write to complete. The thread that completes
// planned writes must therefore never wait for the barrier itself, or a
// snapshot waiting for it would wait forever: it uses ReadAtNoWait,
// PlanRead and PlanWrite, which do not, and leaves everything else to
// other goroutines while its planned writes are in flight.
//
// The caller writes every segment whole, calls Commit, then Release; on
// failure it calls only Release, and the blocks hold whatever the device
// left there, as after a failed write to a disk.
func (h *Volume) PlanWrite(p []byte, off int64) (*blockio.Plan, error) {
	if err := h.check(); err != nil {
		return nil, err
	}
	v := h.v
	if off < 0 || off+int64(len(p)) > v.size.Load() {
		return nil, errf(ErrInvalid, "write of %d bytes at %d outside volume of %d bytes", len(p), off, v.size.Load())
	}
	if len(p) < directWrite || v.s.opts.Faults != nil {
		// Under a fault injector every write goes through it (WriteAt).
		return nil, nil
	}
	if !v.barrier.TryRLock() {
		return nil, unix.EAGAIN
	}
	if err := h.check(); err != nil { // see WriteAt
		v.barrier.RUnlock()
		return nil, err
	}
	head := v.head.Load()
	if err := head.broken(); err != nil {
		v.barrier.RUnlock()
		return nil, err
	}
	first, last := uint64(off>>blockShift), uint64((off+int64(len(p))-1)>>blockShift)
	var segs []blockio.Seg
	if head.placedAll(first, last) {
		segs = head.directSegs(p, off)
	}
	if segs == nil || !head.pin() {
		v.barrier.RUnlock()
		return nil, nil
	}
	return &blockio.Plan{
		Segs:   segs,
		N:      len(p),
		Write:  true,
		Commit: func() { head.dirty.Store(true) },
		Release: func() {
			head.pins.Done()
			v.barrier.RUnlock()
		},
	}, nil
}

// directSegs returns the writes of p at volume offset off, blocks the
// layer has data places for, through its O_DIRECT twin; nil if O_DIRECT
// does not take one of them.
func (l *layer) directSegs(p []byte, off int64) []blockio.Seg {
	d := l.directFile()
	if d == nil {
		return nil
	}
	var buf [4]piece
	ps, err := l.where(buf[:0], off, len(p))
	if err != nil {
		return nil
	}
	segs := make([]blockio.Seg, 0, len(ps))
	for _, pc := range ps {
		q := p[:pc.n]
		p = p[pc.n:]
		if pc.zero || !l.aligned(q, pc.off) {
			return nil
		}
		segs = append(segs, blockio.Seg{Fd: int(d.Fd()), Off: pc.off, Buf: q})
	}
	return segs
}
