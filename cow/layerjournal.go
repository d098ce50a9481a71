package cow

import (
	"errors"
	"io"
	"sort"

	"github.com/cowcsi/cowcsi/cow/internal/ondisk"
)

// journalGrow is how much zero-filled space the journal keeps ahead of its
// last record. Overwriting blocks that already exist makes fdatasync skip the
// inode update an append needs (docs/DECISIONS.md, "Snapshot cost: one
// catalog fdatasync").
const journalGrow = 64 << 10

// joinRecords merges neighbouring records of a layer that continue
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
	if err := appendLog(l.ff, l.journal, buf, l.jOff, &l.jAlloc, journalGrow); err != nil {
		return err
	}
	if !l.dirSynced {
		// The files' directory entries must be durable before a record in
		// them can be relied on.
		if err := syncDir(l.ff, dir); err != nil {
			return l.failSync(err)
		}
	}
	if err := l.ff.Fdatasync(l.journal); err != nil {
		return l.failSync(err)
	}
	l.dirSynced = true
	l.jOff += int64(len(buf))
	return nil
}

// flush makes every write to the layer that completed before the call durable:
// first the data, then the journal records that point at it.
func (l *layer) flush(dir string) error {
	// The files stay open until the syncs are done: a descriptor number
	// used after close could name another file by then.
	l.ioMu.RLock()
	defer l.ioMu.RUnlock()
	if l.closed {
		return errf(ErrClosed, "layer %d", l.num)
	}
	// No files: nothing was ever written (owning needs the files). Checked
	// before flushMu, which ranks after filesMu (lockrank.go).
	if !l.hasFiles() {
		return nil
	}
	l.flushMu.Lock()
	defer l.flushMu.Unlock()
	if err := l.broken(); err != nil {
		return err
	}
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
		if err := l.ff.Fdatasync(l.data); err != nil {
			l.dirty.Store(true)
			putBack()
			return l.failSync(err)
		}
	}
	if err := l.appendRecords(dir, recs); err != nil {
		putBack()
		return err
	}
	return nil
}
