package cow

import (
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"

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
	if err := ValidateID(id); err != nil {
		return Usage{}, err
	}
	s.topo.Lock()
	defer s.topo.Unlock()
	if err := s.checkOpen(); err != nil {
		return Usage{}, err
	}
	v, ok := s.vols[id]
	if !ok {
		return Usage{}, errf(ErrNotFound, "volume %s", id)
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

// Check verifies the whole store: catalog links, files, journals, and that
// every layer's in-memory index equals one rebuilt from the journals. It
// reads every journal and compares every block, so it is meant for tests and
// for offline checks, not for a busy production store.
func (s *Store) Check() error {
	// No merge may be half done while we compare journals with indexes: a
	// child's journal gains the merged ranges before the commit that aliases
	// the parent to it.
	s.gcMu.Lock()
	defer s.gcMu.Unlock()
	s.topo.Lock()
	defer s.topo.Unlock()
	if err := s.checkOpen(); err != nil {
		return err
	}
	var problems []string
	bad := func(format string, args ...any) { problems = append(problems, fmt.Sprintf(format, args...)) }

	// Catalog links.
	if len(s.cat.layers) != len(s.byNum) {
		bad("catalog has %d layers, memory %d", len(s.cat.layers), len(s.byNum))
	}
	for n, rec := range s.cat.layers {
		l, ok := s.byNum[n]
		if !ok {
			bad("layer %d in catalog, not in memory", n)
			continue
		}
		var parent uint32
		if l.parent != nil {
			parent = l.parent.num
			if _, ok := s.byNum[parent]; !ok {
				bad("layer %d: parent %d is gone", n, parent)
			}
			if !l.parent.frozen {
				bad("layer %d: parent %d is not frozen", n, parent)
			}
		}
		if rec.Parent != parent || rec.Frozen != l.frozen || rec.Size != l.size.Load() {
			bad("layer %d: catalog %+v differs from memory (parent %d frozen %v size %d)", n, *rec, parent, l.frozen, l.size.Load())
		}
	}
	heads := map[uint32]string{}
	for id, rec := range s.cat.volumes {
		v, ok := s.vols[id]
		if !ok {
			bad("volume %s in catalog, not in memory", id)
			continue
		}
		h := v.head.Load()
		if h.num != rec.Head || h.frozen || v.size.Load() != rec.Size || h.size.Load() != rec.Size {
			bad("volume %s: head %d (catalog %d) frozen %v size %d/%d/%d", id, h.num, rec.Head, h.frozen, v.size.Load(), rec.Size, h.size.Load())
		}
		if other, dup := heads[h.num]; dup {
			bad("volumes %s and %s share head layer %d", id, other, h.num)
		}
		heads[h.num] = id
		h.filesMu.Lock()
		if h.data != nil {
			st, err := h.data.Stat()
			switch {
			case err != nil:
				bad("volume %s: head data file: %v", id, err)
			case st.Size() < int64(h.next.Load())<<blockShift:
				bad("volume %s: head data file size %d, places up to %d", id, st.Size(), int64(h.next.Load())<<blockShift)
			}
		}
		h.filesMu.Unlock()
	}
	if len(s.vols) != len(s.cat.volumes) {
		bad("memory has %d volumes, catalog %d", len(s.vols), len(s.cat.volumes))
	}
	for id, rec := range s.cat.snaps {
		if l, ok := s.byNum[rec.Layer]; !ok || !l.frozen {
			bad("snapshot %s: layer %d missing or not frozen", id, rec.Layer)
		}
	}

	// Files: exactly the live layers' files exist.
	ents, err := os.ReadDir(s.layerFS)
	if err != nil {
		bad("read layers dir: %v", err)
	}
	files := map[uint32]int{}
	for _, e := range ents {
		base := strings.TrimSuffix(strings.TrimSuffix(e.Name(), ".data"), ".map")
		n, err := strconv.ParseUint(base, 16, 32)
		if err != nil || base == e.Name() {
			bad("stray file %s in layers dir", e.Name())
			continue
		}
		files[uint32(n)]++
		if _, ok := s.byNum[uint32(n)]; !ok {
			bad("orphan layer file %s", e.Name())
		}
	}
	for n, l := range s.byNum {
		switch {
		case files[n] == 2:
		case files[n] == 0 && !l.hasFiles() && l.owned.Load() == 0:
			// A layer that never owned a block has no files yet.
		default:
			bad("layer %d has %d of its 2 files (owns %d blocks)", n, files[n], l.owned.Load())
		}
	}

	// Indexes: rebuild from journals (plus heads' pending records) and compare.
	fresh := map[uint32]*tree{}
	var build func(l *layer) (*tree, error)
	build = func(l *layer) (*tree, error) {
		if t, ok := fresh[l.num]; ok {
			return t, nil
		}
		var t tree
		if l.parent != nil {
			pt, err := build(l.parent)
			if err != nil {
				return nil, err
			}
			t = pt.fork()
		} else {
			t = tree{gen: newGen()}
		}
		ranges, err := l.readRanges()
		if err != nil {
			return nil, err
		}
		l.treeMu.RLock()
		ranges = append(ranges, l.pending...)
		l.treeMu.RUnlock()
		limit := uint64(l.size.Load()) >> blockShift
		var locs locMap
		for _, r := range ranges {
			if r.End() > limit {
				bad("layer %d owns %d+%d beyond its %d blocks", l.num, r.Start, r.Count, limit)
				continue
			}
			t.setRange(r.Start, r.End(), l.num)
			if !fitsLocs(r) {
				bad("layer %d: blocks %d+%d at file block %d, beyond %d", l.num, r.Start, r.Count, r.Loc, uint64(maxFileBlocks))
				continue
			}
			locs.set(r.Start, r.Count, r.Loc)
		}
		checkLocs(l, &locs, limit, bad)
		fresh[l.num] = &t
		return &t, nil
	}
	for _, l := range s.byNum {
		t, err := build(l)
		if err != nil {
			bad("layer %d: %v", l.num, err)
			continue
		}
		limit := uint64(l.size.Load()) >> blockShift
		l.treeMu.RLock()
		mism := 0
		for b := uint64(0); b < limit; b++ {
			want, got := t.get(b), l.tree.get(b)
			var wl, gl *layer
			if want != 0 {
				wl = s.byNum[want]
			}
			if got != 0 {
				gl = s.resolve(got)
			}
			if wl != gl {
				if mism < 3 {
					bad("layer %d block %d: index says layer %d, journals say %d", l.num, b, got, want)
				}
				mism++
			}
		}
		l.treeMu.RUnlock()
	}
	if len(problems) == 0 {
		return nil
	}
	sort.Strings(problems)
	return fmt.Errorf("%w: %s", ErrCorrupt, strings.Join(problems, "; "))
}

// checkLocs compares a layer's locations with want, rebuilt from its
// journal and pending records, and checks that no two blocks share a place.
func checkLocs(l *layer, want *locMap, limit uint64, bad func(string, ...any)) {
	l.treeMu.RLock()
	defer l.treeMu.RUnlock()
	mism := 0
	for b := uint64(0); b < limit; b++ {
		wl, _, wok := want.get(b)
		gl, _, gok := l.locs.get(b)
		if wl != gl || wok != gok {
			if mism < 3 {
				bad("layer %d block %d: place %d (%v), journal says %d (%v)", l.num, b, gl, gok, wl, wok)
			}
			mism++
		}
	}
	if l.locs.blocks != want.blocks || int64(l.locs.blocks) != l.owned.Load() {
		bad("layer %d: %d blocks placed, journal %d, owned count %d", l.num, l.locs.blocks, want.blocks, l.owned.Load())
	}
	var used [][2]uint64
	l.locs.forEach(func(_, count, loc uint64) {
		if loc != ondisk.LocZero {
			used = append(used, [2]uint64{loc, loc + count})
		}
	})
	sort.Slice(used, func(i, j int) bool { return used[i][0] < used[j][0] })
	for i := 1; i < len(used); i++ {
		if used[i][0] < used[i-1][1] {
			bad("layer %d: file blocks %d-%d used twice", l.num, used[i][0], used[i-1][1])
			break
		}
	}
	if end := l.locs.end(); end > l.next.Load() {
		bad("layer %d: places end at %d, next free block %d", l.num, end, l.next.Load())
	}
}
