package cow

import (
	"github.com/cowcsi/cowcsi/cow/internal/ondisk"
)

// Where a layer's blocks are: the pieces of its data file that hold a
// range of the volume, and the placing of the blocks it comes to own.

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

// place records that a head owns the blocks of recs at their
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
