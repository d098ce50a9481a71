package cow

import (
	"errors"
	"fmt"
	"os"

	"github.com/cowcsi/cowcsi/cow/internal/faultfs"
	"github.com/cowcsi/cowcsi/cow/internal/ondisk"
)

// openLayerFiles opens an existing layer and returns its owned ranges. A
// layer without a journal never owned a block: it stays without files.
func openLayerFiles(dir string, num uint32, size int64, arena *locArena, ff *faultfs.FS) (*layer, []ondisk.Range, error) {
	l := newLayerStruct(num, size, arena, ff)
	dp, jp := layerPaths(dir, num)
	img, err := os.ReadFile(jp)
	if errors.Is(err, os.ErrNotExist) {
		if err := ff.Remove(dp); err != nil && !errors.Is(err, os.ErrNotExist) {
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
			if err := ff.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
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
	data, err := openData(ff, dp, os.O_RDWR)
	if errors.Is(err, os.ErrNotExist) && len(ranges) == 0 {
		// Crashed between creating the journal and the data file.
		if err := ff.Remove(jp); err != nil {
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
	j, err := openFile(ff, jp, os.O_RDWR, 0)
	if err != nil {
		data.Close()
		return nil, nil, ioErr(err)
	}
	l.data, l.journal, l.jOff, l.jAlloc, l.dirSynced = data, j, next, int64(len(img)), true
	if err := l.zeroJournalTail(img, next); err != nil {
		l.close()
		return nil, nil, err
	}
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

// zeroJournalTail zeroes what follows the journal's last valid record
// (next) in its image img, durably, as the catalog does with its log. A
// power cut during an append can leave a later page of records on disk
// and not an earlier one: replay stops at the zero gap, and without this
// the records behind it would count again once later appends fill the
// gap, naming file space that reclaim gave back and later writes reused.
func (l *layer) zeroJournalTail(img []byte, next int64) error {
	return zeroLogTail(l.ff, l.journal, img, next)
}
