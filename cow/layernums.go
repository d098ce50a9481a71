package cow

import (
	"errors"
	"fmt"
	"slices"
	"sort"
)

// Layer numbers name a layer's files (layers/N.data, N.map), its catalog
// record and the entries of the indexes that point at its blocks, and the
// slot table holds at most layerNumLimit of them. So numbers are reused:
// a store that takes and deletes snapshots for ever must not run out.
//
// A number is reused only when nothing of its old layer can come back,
// in memory or after a crash:
//   - the catalog no longer has the layer (its deletion was committed, and
//     a later record of the number comes after it in the log);
//   - no index names it: its slot is empty (a merged layer's number stays
//     in the slot table, as an alias of the layer it went into, until that
//     layer is removed);
//   - its files are gone for good: removed, then the layers directory
//     synced. A journal that came back after a crash would otherwise be
//     read as the new layer's, since the header holds only the number.
//
// Removals retire numbers. A merge leaves the merged layer's number in the
// indexes that name its blocks: adopt renames them in a head at once, and
// the merger renames them everywhere else after merging (relabelAliases);
// once no read that resolved the old name can be in flight (dropStale) the
// number is retired too. The merger settles retired numbers (removes any file left,
// syncs the directory) and only then are they free. At open, numbers below
// the catalog's highest that no layer holds are free, once the orphan files
// are removed and the directory synced. Layers created but never committed
// (a failed snapshot or clone) do not give their number back before the
// next open.

// layerNumLimit is how many layer numbers the slot table holds.
const layerNumLimit = slotChunks * slotChunkSize

// numRange is the free layer numbers lo to hi, both included.
type numRange struct{ lo, hi uint32 }

// layerNums hands out layer numbers. Guarded by Store.topo.
type layerNums struct {
	free    []numRange // reusable; taken from the end
	retired []uint32   // removed layers' numbers, not settled yet
	limit   uint32     // numbers are below it
}

// take returns a free number, or false.
func (ns *layerNums) take() (uint32, bool) {
	for len(ns.free) > 0 {
		r := &ns.free[len(ns.free)-1]
		n := r.lo
		if r.lo == r.hi {
			ns.free = ns.free[:len(ns.free)-1]
		} else {
			r.lo++
		}
		if n < ns.limit {
			return n, true
		}
	}
	return 0, false
}

// initFree makes every number from 1 to max that is not in live free.
func (ns *layerNums) initFree(live map[uint32]*layer, max uint32) {
	nums := make([]uint32, 0, len(live)+1)
	for n := range live {
		nums = append(nums, n)
	}
	nums = append(nums, max+1)
	sort.Slice(nums, func(i, j int) bool { return nums[i] > nums[j] })
	// Highest gaps first, so that the lowest numbers are taken first.
	ns.free = ns.free[:0]
	prev := max + 1 // the lowest number looked at so far
	for _, n := range nums {
		if n+1 < prev {
			ns.free = append(ns.free, numRange{lo: n + 1, hi: prev - 1})
		}
		prev = n
	}
	if prev > 1 {
		ns.free = append(ns.free, numRange{lo: 1, hi: prev - 1})
	}
}

// newLayerNum returns a number for a new layer: a free one, else one above
// every number the catalog has used. Caller holds topo.
func (s *Store) newLayerNum() (uint32, error) {
	if n, ok := s.nums.take(); ok {
		return n, nil
	}
	num := s.cat.maxLayer + 1
	for _, ok := s.byNum[num]; ok; _, ok = s.byNum[num] {
		num++
	}
	if num >= s.nums.limit {
		return 0, errf(ErrNoSpace, "layer numbers exhausted: %d layers or merged layers still in use", len(s.byNum))
	}
	return num, nil
}

// retire records that the layer numbered nums no longer exists and no
// index names it. Caller holds topo.
func (s *Store) retire(nums ...uint32) {
	s.nums.retired = append(s.nums.retired, nums...)
}

// settleRetired frees the retired numbers: it removes any file of theirs
// still there and syncs the layers directory. Numbers whose files cannot
// be removed stay retired. Called by the merger, without topo.
func (s *Store) settleRetired() error {
	s.topo.Lock()
	nums := s.nums.retired
	s.nums.retired = nil
	s.topo.Unlock()
	if len(nums) == 0 {
		return nil
	}
	var keep, done []uint32
	var errs []error
	for _, n := range nums {
		if err := removeLayerFiles(s.opts.Faults, s.layerFS, n); err != nil {
			keep = append(keep, n)
			errs = append(errs, fmt.Errorf("removing the files of layer %d: %w", n, err))
		} else {
			done = append(done, n)
		}
	}
	if len(done) > 0 {
		if err := syncDir(s.opts.Faults, s.layerFS); err != nil {
			keep = append(keep, done...)
			done = nil
			errs = append(errs, err)
		}
	}
	s.topo.Lock()
	defer s.topo.Unlock()
	s.nums.retired = append(s.nums.retired, keep...)
	for _, n := range done {
		s.nums.free = append(s.nums.free, numRange{lo: n, hi: n})
	}
	return errors.Join(errs...)
}

// dropStale frees the numbers of the layers merged into l that no index
// names any more (layer.stale). The caller holds topo, and the barriers of
// the volumes whose chain holds l exclusively: no read that could resolve
// them is in flight.
func (s *Store) dropStale(l *layer) {
	for _, n := range l.stale {
		s.slots.set(n, nil)
	}
	s.retire(l.stale...)
	l.stale = nil
}

// volumesAbove lists the volumes whose chain holds l. Caller holds topo.
func (s *Store) volumesAbove(l *layer) []*volume {
	var out []*volume
	for _, v := range s.vols {
		if v.head.Load().hasAncestor(l) {
			out = append(out, v)
		}
	}
	return out
}

// dropStaleHeld runs dropStale on the layers of the chains of held whose
// volumes are all in held. The caller holds topo and the barriers of held
// exclusively (a snapshot or a clone): so a volume that is never idle
// still gives its numbers back at its next snapshot.
func (s *Store) dropStaleHeld(held ...*volume) {
	for _, v := range held {
		for l := v.head.Load(); l != nil; l = l.parent {
			if len(l.stale) == 0 {
				continue
			}
			all := true
			for _, w := range s.volumesAbove(l) {
				all = all && slices.Contains(held, w)
			}
			if all {
				s.dropStale(l)
			}
		}
	}
}

// dropIdleStale runs dropStale on layers whose volumes have no I/O in
// flight; the others wait for a later pass or a snapshot. Caller holds
// topo.
func (s *Store) dropIdleStale() {
	for _, l := range s.byNum {
		if len(l.stale) == 0 {
			continue
		}
		var locked []*volume
		idle := true
		for _, v := range s.volumesAbove(l) {
			// TryLock: no waiting under topo, so no lock order to keep.
			if !v.barrier.TryLock() {
				idle = false
				break
			}
			locked = append(locked, v)
		}
		if idle {
			s.dropStale(l)
		}
		for _, v := range locked {
			v.barrier.Unlock()
		}
	}
}

// hasAncestor reports whether a is l or below it.
func (l *layer) hasAncestor(a *layer) bool {
	for ; l != nil; l = l.parent {
		if l == a {
			return true
		}
	}
	return false
}

// relabelAliases makes every index that names a layer merged into a frozen
// layer c (c.aliases) name c instead: c's and those of every layer above
// it, the only ones that share c's blocks. The numbers then go to c.stale,
// freed once no read that resolved them before can be in flight. Frozen
// trees get a fresh generation first: their nodes are shared with the
// layers above, so the changes copy them. Caller holds topo (no layer is
// created, frozen or merged meanwhile).
func (s *Store) relabelAliases() {
	for _, c := range s.byNum {
		if len(c.aliases) == 0 {
			continue
		}
		from := make(map[uint32]bool, len(c.aliases))
		for _, a := range c.aliases {
			from[a] = true
		}
		for _, x := range s.byNum {
			if !x.hasAncestor(c) {
				continue
			}
			x.treeMu.Lock()
			if x.frozen {
				x.tree.gen = newGen()
			}
			x.tree.relabel(from, c.num)
			x.treeMu.Unlock()
		}
		c.stale = append(c.stale, c.aliases...)
		c.aliases = nil
	}
}
