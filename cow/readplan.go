package cow

import (
	"io"

	"github.com/cowcsi/cowcsi/cow/internal/blockio"
)

// PlanRead resolves a read of p at off like ReadAt, fills the parts that
// read as zeros, and returns what to read from which layer file into the
// rest of p, for a caller that does the reads itself (the FUSE ring submits
// them to io_uring, so a read from disk occupies no thread). The layer files
// stay open until the plan's Release. The view is the volume's at the time
// of the call; writes after it may or may not show, as with any read that
// races a write.
func (h *Volume) PlanRead(p []byte, off int64) (*blockio.Plan, error) {
	if err := h.check(); err != nil {
		return nil, err
	}
	if off < 0 {
		return nil, errf(ErrInvalid, "negative offset %d", off)
	}
	size := h.v.size.Load()
	if off >= size {
		return nil, io.EOF
	}
	pl := &blockio.Plan{N: len(p)}
	if int64(pl.N) > size-off {
		pl.N, pl.EOF = int(size-off), true
	}
	var pinned []*layer
	release := func() {
		for _, l := range pinned {
			l.pins.Done()
		}
	}
	v := h.v
	v.barrier.RLock()
	err := v.resolveRuns(p[:pl.N], off, func(owner uint32, q []byte, at int64) error {
		if owner == 0 {
			clear(q)
			return nil
		}
		for {
			l := v.s.resolve(owner)
			if l == nil {
				return errf(ErrCorrupt, "block at %d owned by unknown layer %d", at, owner)
			}
			l.ioMu.RLock()
			if l.closed {
				// Merged away between resolve and lock: resolve again.
				l.ioMu.RUnlock()
				if l.mergedInto.Load() == nil {
					return errf(ErrClosed, "layer %d", l.num)
				}
				continue
			}
			// A pin keeps the file open after the locks are gone; the
			// merge leaves the blocks in place until it closes the file.
			l.pins.Add(1)
			fd := int(l.data.Fd())
			l.ioMu.RUnlock()
			pinned = append(pinned, l)
			pl.Segs = append(pl.Segs, blockio.Seg{Fd: fd, Off: at, Buf: q})
			return nil
		}
	})
	v.barrier.RUnlock()
	if err != nil {
		release()
		return nil, err
	}
	pl.Release = release
	return pl, nil
}
