package cow

import (
	"github.com/cowcsi/cowcsi/cow/internal/ondisk"
)

// Changed-block tracking comes from the journals: the blocks that differ
// between two snapshots of one lineage are the blocks owned by the layers
// between them. Cost is O(changed ranges), never a data comparison.

func toExtents(ranges []ondisk.Range, size int64) []Extent {
	limit := uint64(size) >> blockShift
	var out []Extent
	for _, r := range coalesce(ranges) {
		if r.Start >= limit {
			break
		}
		end := min(r.End(), limit)
		out = append(out, Extent{Offset: int64(r.Start) << blockShift, Length: int64(end-r.Start) << blockShift})
	}
	return out
}

// lookupVolume returns the volume id of the open store. Caller holds topo.
func (s *Store) lookupVolume(id string) (*volume, error) {
	if err := ValidateID(id); err != nil {
		return nil, err
	}
	if err := s.checkOpen(); err != nil {
		return nil, err
	}
	v, ok := s.vols[id]
	if !ok {
		return nil, errf(ErrNotFound, "volume %s", id)
	}
	return v, nil
}

// snapshotLayer returns the snapshot's record and layer. Caller holds topo.
func (s *Store) snapshotLayer(id string) (*ondisk.SnapshotRec, *layer, error) {
	if err := ValidateID(id); err != nil {
		return nil, nil, err
	}
	if err := s.checkOpen(); err != nil {
		return nil, nil, err
	}
	rec, ok := s.cat.snaps[id]
	if !ok {
		return nil, nil, errf(ErrNotFound, "snapshot %s", id)
	}
	return rec, s.byNum[rec.Layer], nil
}

// AllocatedExtents lists the byte ranges of a snapshot that hold data (or
// explicit zeros): everything else reads as zeros. Sorted and coalesced.
func (s *Store) AllocatedExtents(snapshotID string) ([]Extent, error) {
	s.topo.Lock()
	defer s.topo.Unlock()
	rec, l, err := s.snapshotLayer(snapshotID)
	if err != nil {
		return nil, err
	}
	var all []ondisk.Range
	for ; l != nil; l = l.parent {
		rs, err := l.readRanges()
		if err != nil {
			return nil, err
		}
		all = append(all, rs...)
	}
	return toExtents(all, rec.Size), nil
}

// ChangedExtents lists the byte ranges that may differ between base and
// target, two snapshots of one volume lineage with base the older.
func (s *Store) ChangedExtents(baseSnapshotID, targetSnapshotID string) ([]Extent, error) {
	s.topo.Lock()
	defer s.topo.Unlock()
	_, base, err := s.snapshotLayer(baseSnapshotID)
	if err != nil {
		return nil, err
	}
	trec, l, err := s.snapshotLayer(targetSnapshotID)
	if err != nil {
		return nil, err
	}
	var all []ondisk.Range
	for ; l != base; l = l.parent {
		if l == nil {
			return nil, errf(ErrInvalid, "snapshot %s is not an ancestor of %s", baseSnapshotID, targetSnapshotID)
		}
		rs, err := l.readRanges()
		if err != nil {
			return nil, err
		}
		all = append(all, rs...)
	}
	return toExtents(all, trec.Size), nil
}

// VolumeUsage reports a volume's logical size and the bytes its view maps.
func (s *Store) VolumeUsage(id string) (Usage, error) {
	s.topo.Lock()
	defer s.topo.Unlock()
	v, err := s.lookupVolume(id)
	if err != nil {
		return Usage{}, err
	}
	size := v.size.Load()
	head := v.head.Load()
	head.treeMu.RLock()
	n := head.tree.countOwned(uint64(size)>>blockShift, func(o uint32) bool { return o != 0 })
	head.treeMu.RUnlock()
	return Usage{Size: size, Allocated: int64(n) << blockShift}, nil
}

// SnapshotUsage reports a snapshot's size, the bytes its view maps, and the
// bytes only it holds: what deleting it frees once merges are done.
func (s *Store) SnapshotUsage(id string) (Usage, error) {
	s.topo.Lock()
	defer s.topo.Unlock()
	rec, l, err := s.snapshotLayer(id)
	if err != nil {
		return Usage{}, err
	}
	u := Usage{Size: rec.Size}
	l.treeMu.RLock()
	u.Allocated = int64(l.tree.countOwned(uint64(rec.Size)>>blockShift, func(o uint32) bool { return o != 0 })) << blockShift
	l.treeMu.RUnlock()
	var kids []*layer
	for _, c := range s.byNum {
		if c.parent == l {
			kids = append(kids, c)
		}
	}
	ranges, err := l.readRanges()
	if err != nil {
		return Usage{}, err
	}
	// A block of l is freed by deleting the snapshot if every child
	// overrides it (with no child, every block of l is freed).
	var excl int64
	for _, r := range coalesce(ranges) {
		for b := r.Start; b < r.End(); b++ {
			all := true
			for _, c := range kids {
				c.treeMu.RLock()
				owner := s.resolve(c.tree.get(b))
				c.treeMu.RUnlock()
				if owner != c {
					all = false
					break
				}
			}
			if all {
				excl++
			}
		}
	}
	u.Exclusive = excl << blockShift
	return u, nil
}
