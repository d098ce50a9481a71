package cow

import (
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
	stream := pl.N >= streamRead
	v := h.v
	v.barrier.RLock()
	err = v.resolveRuns(p[:pl.N], off, func(owner uint32, q []byte, at int64) error {
		if owner == 0 {
			clear(q)
			return nil
		}
		l, err := v.s.lockOwner(owner, at)
		if err != nil {
			return err
		}
		// A pin keeps the file open after the lock is gone; a merge
		// leaves the blocks in place until it closes the file.
		l.pins.Add(1)
		seg := blockio.Seg{Fd: int(l.data.Fd()), Off: at, Buf: q}
		if stream {
			seg.Fd, seg.Flags = l.streamFile(q, at)
		}
		l.ioMu.RUnlock()
		pinned = append(pinned, l)
		pl.Segs = append(pl.Segs, seg)
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
