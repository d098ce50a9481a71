package cow

import (
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"

	"github.com/cowcsi/cowcsi/cow/internal/ondisk"
)

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
	c := &storeCheck{s: s}
	c.layers()
	c.volumes()
	c.snapshots()
	c.files()
	c.numbers()
	c.indexes()
	if len(c.problems) == 0 {
		return nil
	}
	sort.Strings(c.problems)
	return fmt.Errorf("%w: %s", ErrCorrupt, strings.Join(c.problems, "; "))
}

// storeCheck is one run of Check, phase by phase, under Store.gcMu and
// Store.topo; each phase adds what it finds to problems.
type storeCheck struct {
	s        *Store
	problems []string
}

func (c *storeCheck) bad(format string, args ...any) {
	c.problems = append(c.problems, fmt.Sprintf(format, args...))
}

// layers checks that the catalog's layers are the ones in memory, with the
// same parent, state and size, and that every parent is frozen.
func (c *storeCheck) layers() {
	s := c.s
	if len(s.cat.layers) != len(s.byNum) {
		c.bad("catalog has %d layers, memory %d", len(s.cat.layers), len(s.byNum))
	}
	for n, rec := range s.cat.layers {
		l, ok := s.byNum[n]
		if !ok {
			c.bad("layer %d in catalog, not in memory", n)
			continue
		}
		var parent uint32
		if l.parent != nil {
			parent = l.parent.num
			if _, ok := s.byNum[parent]; !ok {
				c.bad("layer %d: parent %d is gone", n, parent)
			}
			if !l.parent.frozen {
				c.bad("layer %d: parent %d is not frozen", n, parent)
			}
		}
		if rec.Parent != parent || rec.Frozen != l.frozen || rec.Size != l.size.Load() {
			c.bad("layer %d: catalog %+v differs from memory (parent %d frozen %v size %d)", n, *rec, parent, l.frozen, l.size.Load())
		}
	}
}

// volumes checks the catalog's volumes against memory: each has its own
// unfrozen head of its size, whose data file holds every place it gave.
func (c *storeCheck) volumes() {
	s := c.s
	heads := map[uint32]string{}
	for id, rec := range s.cat.volumes {
		v, ok := s.vols[id]
		if !ok {
			c.bad("volume %s in catalog, not in memory", id)
			continue
		}
		h := v.head.Load()
		if h.num != rec.Head || h.frozen || v.size.Load() != rec.Size || h.size.Load() != rec.Size {
			c.bad("volume %s: head %d (catalog %d) frozen %v size %d/%d/%d", id, h.num, rec.Head, h.frozen, v.size.Load(), rec.Size, h.size.Load())
		}
		if other, dup := heads[h.num]; dup {
			c.bad("volumes %s and %s share head layer %d", id, other, h.num)
		}
		heads[h.num] = id
		h.filesMu.Lock()
		if h.data != nil {
			st, err := h.data.Stat()
			switch {
			case err != nil:
				c.bad("volume %s: head data file: %v", id, err)
			case st.Size() < int64(h.next.Load())<<blockShift:
				c.bad("volume %s: head data file size %d, places up to %d", id, st.Size(), int64(h.next.Load())<<blockShift)
			}
		}
		h.filesMu.Unlock()
	}
	if len(s.vols) != len(s.cat.volumes) {
		c.bad("memory has %d volumes, catalog %d", len(s.vols), len(s.cat.volumes))
	}
}

// snapshots checks that every snapshot's layer exists and is frozen.
func (c *storeCheck) snapshots() {
	for id, rec := range c.s.cat.snaps {
		if l, ok := c.s.byNum[rec.Layer]; !ok || !l.frozen {
			c.bad("snapshot %s: layer %d missing or not frozen", id, rec.Layer)
		}
	}
}

// files checks that exactly the live layers' files exist.
func (c *storeCheck) files() {
	s := c.s
	ents, err := os.ReadDir(s.layerFS)
	if err != nil {
		c.bad("read layers dir: %v", err)
	}
	files := map[uint32]int{}
	for _, e := range ents {
		base := strings.TrimSuffix(strings.TrimSuffix(e.Name(), ".data"), ".map")
		n, err := strconv.ParseUint(base, 16, 32)
		if err != nil || base == e.Name() {
			c.bad("stray file %s in layers dir", e.Name())
			continue
		}
		files[uint32(n)]++
		if _, ok := s.byNum[uint32(n)]; !ok {
			c.bad("orphan layer file %s", e.Name())
		}
	}
	for n, l := range s.byNum {
		switch {
		case files[n] == 2:
		case files[n] == 0 && !l.hasFiles() && l.owned.Load() == 0:
			// A layer that never owned a block has no files yet.
		default:
			c.bad("layer %d has %d of its 2 files (owns %d blocks)", n, files[n], l.owned.Load())
		}
	}
}

// numbers checks that no free or retired layer number is a layer's, or
// still named by an index (its slot is set): layernums.go.
func (c *storeCheck) numbers() {
	s := c.s
	used := func(n uint32) bool {
		_, live := s.byNum[n]
		return live || s.slots.get(n) != nil
	}
	for _, n := range s.nums.retired {
		if used(n) {
			c.bad("retired layer number %d is in use", n)
		}
	}
	for _, r := range s.nums.free {
		if r.lo == 0 || r.lo > r.hi {
			c.bad("free layer numbers %d-%d", r.lo, r.hi)
			continue
		}
		for n := range s.byNum {
			if n >= r.lo && n <= r.hi {
				c.bad("free layer number %d is a layer's", n)
			}
		}
		// Slots: a free range after open may be long, and only numbers
		// used in this process can have one.
		for n := r.lo; n <= min(r.hi, r.lo+1<<16); n++ {
			if s.slots.get(n) != nil {
				c.bad("free layer number %d is named by an index", n)
			}
		}
	}
}

// indexes rebuilds every layer's index and locations from the journals
// (plus heads' pending records) and compares them with memory.
func (c *storeCheck) indexes() {
	s := c.s
	fresh := map[uint32]*tree{}
	unmerged := c.unmergedParents()
	for _, l := range s.byNum {
		t, err := c.rebuild(l, fresh)
		if err != nil {
			c.bad("layer %d: %v", l.num, err)
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
			if wl != gl && (gl == nil || unmerged[gl] != wl) {
				if mism < 3 {
					c.bad("layer %d block %d: index says layer %d, journals say %d", l.num, b, got, want)
				}
				mism++
			}
		}
		l.treeMu.RUnlock()
	}
}

// unmergedParents returns the layers a merge may have stopped between
// its steps 2 and 3 (gc.go): unreferenced layers with a single child,
// mapped to that child. The child's journal may already hold copies of
// the parent's blocks, with the same data, while the indexes still name
// the parent until the merge runs again and commits.
func (c *storeCheck) unmergedParents() map[*layer]*layer {
	s := c.s
	referenced := map[uint32]bool{}
	for _, v := range s.vols {
		referenced[v.head.Load().num] = true
	}
	for _, sn := range s.cat.snaps {
		referenced[sn.Layer] = true
	}
	kids := map[*layer][]*layer{}
	for _, l := range s.byNum {
		if l.parent != nil {
			kids[l.parent] = append(kids[l.parent], l)
		}
	}
	out := map[*layer]*layer{}
	for p, k := range kids {
		if len(k) == 1 && !referenced[p.num] {
			out[p] = k[0]
		}
	}
	return out
}

// rebuild returns l's index rebuilt from its journal and pending records
// over its parent's, rebuilt first (fresh holds those done), and checks
// l's locations on the way.
func (c *storeCheck) rebuild(l *layer, fresh map[uint32]*tree) (*tree, error) {
	if t, ok := fresh[l.num]; ok {
		return t, nil
	}
	var t tree
	if l.parent != nil {
		pt, err := c.rebuild(l.parent, fresh)
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
			c.bad("layer %d owns %d+%d beyond its %d blocks", l.num, r.Start, r.Count, limit)
			continue
		}
		t.setRange(r.Start, r.End(), l.num)
		if !fitsLocs(r) {
			c.bad("layer %d: blocks %d+%d at file block %d, beyond %d", l.num, r.Start, r.Count, r.Loc, uint64(maxFileBlocks))
			continue
		}
		locs.set(r.Start, r.Count, r.Loc)
	}
	c.locations(l, &locs, limit)
	c.fileSpace(l)
	fresh[l.num] = &t
	return &t, nil
}

// locations compares a layer's locations with want, rebuilt from its
// journal and pending records, and checks that no two blocks share a place.
func (c *storeCheck) locations(l *layer, want *locMap, limit uint64) {
	l.treeMu.RLock()
	defer l.treeMu.RUnlock()
	mism := 0
	for b := uint64(0); b < limit; b++ {
		wl, _, wok := want.get(b)
		gl, _, gok := l.locs.get(b)
		if wl != gl || wok != gok {
			if mism < 3 {
				c.bad("layer %d block %d: place %d (%v), journal says %d (%v)", l.num, b, gl, gok, wl, wok)
			}
			mism++
		}
	}
	if l.locs.blocks != want.blocks || int64(l.locs.blocks) != l.owned.Load() {
		c.bad("layer %d: %d blocks placed, journal %d, owned count %d", l.num, l.locs.blocks, want.blocks, l.owned.Load())
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
			c.bad("layer %d: file blocks %d-%d used twice", l.num, used[i][0], used[i-1][1])
			break
		}
	}
	if end := l.locs.end(); end > l.next.Load() {
		c.bad("layer %d: places end at %d, next free block %d", l.num, end, l.next.Load())
	}
}

// fileSpace checks that every place of a layer lies inside its data file:
// a place past the end names space that was given back (a record that
// outlived the reclaim of its blocks).
func (c *storeCheck) fileSpace(l *layer) {
	l.treeMu.RLock()
	end := l.locs.end()
	l.treeMu.RUnlock()
	l.filesMu.Lock()
	defer l.filesMu.Unlock()
	if l.data == nil {
		return
	}
	st, err := l.data.Stat()
	switch {
	case err != nil:
		c.bad("layer %d: data file: %v", l.num, err)
	case uint64(st.Size()) < end<<blockShift:
		c.bad("layer %d: places end at file block %d, past the data file's %d bytes", l.num, end, st.Size())
	}
}
