package cow

import "sync/atomic"

// The resolved index maps every block of a layer's view to the layer that
// holds it (its "owner"; 0 = no layer, reads as zeros). It is a three-level
// radix tree shared between layers by path copying:
//
//   - every tree version has a generation; a node belongs to the version whose
//     generation it carries and may be changed in place only by it;
//   - freezing a layer keeps its tree as is and gives the new head a tree with
//     the same root and a fresh generation: O(1), nothing copied;
//   - the first write under a shared node copies that node (root 32 KiB, mid
//     8 KiB, leaf at most 1 KiB): a cost paid once per node per snapshot, by
//     the write, never by the snapshot.
//
// Reads therefore cost one root, one mid and one leaf lookup whatever the
// depth of the chain. A leaf stores owners as a sorted list of runs while that
// is small (one run for a leaf one layer wrote whole, a few for sparse writes:
// 8 bytes a run), and switches to a palette with bit-packed indices (1, 2, 4,
// 8 or 16 bits per block) once runs would cost more than 1 bit per block.

const (
	leafShift  = 13 // 8192 blocks = 32 MiB per leaf
	leafBlocks = 1 << leafShift
	midShift   = 10 // 1024 leaves = 32 GiB per mid node
	midFanout  = 1 << midShift
	rootShift  = 11 // 2048 mids = 64 TiB per tree
	rootFanout = 1 << rootShift

	// MaxVolumeSize is the largest volume the index can address.
	MaxVolumeSize = int64(1) << (leafShift + midShift + rootShift + blockShift)
)

var generations atomic.Uint64

func newGen() uint64 { return generations.Add(1) }

type leaf struct {
	gen uint64
	// Run form (bits == nil): runs[0].start == 0, starts increase, and
	// neighbours have different owners.
	runs []run
	// Packed form: pal holds owners, bits width-bit indices into it.
	pal   []uint32
	width uint8
	bits  []uint64
}

// run: blocks from start up to the next run's start belong to owner.
type run struct{ start, owner uint32 }

// maxRuns is where a leaf switches to the packed form: 128 runs take 1 KiB,
// what 1 bit per block takes.
const maxRuns = leafBlocks / 64

type midNode struct {
	gen    uint64
	leaves [midFanout]*leaf
}

type rootNode struct {
	gen  uint64
	mids [rootFanout]*midNode
}

// tree is one version of the index. The zero value is an empty tree.
type tree struct {
	root *rootNode
	gen  uint64
}

// fork returns a new version sharing everything with t. t must not be
// changed afterwards if t is frozen; either may be changed (copy on write).
func (t *tree) fork() tree { return tree{root: t.root, gen: newGen()} }

func split(b uint64) (r, m, l uint64) {
	return b >> (leafShift + midShift), (b >> leafShift) & (midFanout - 1), b & (leafBlocks - 1)
}

// get returns the owner of block b.
func (t *tree) get(b uint64) uint32 {
	if t.root == nil {
		return 0
	}
	r, m, l := split(b)
	mid := t.root.mids[r]
	if mid == nil {
		return 0
	}
	lf := mid.leaves[m]
	if lf == nil {
		return 0
	}
	return lf.get(l)
}

// leafAt returns the leaf that holds block b (nil if none) so callers that
// walk a run of blocks pay the descent once per leaf.
func (t *tree) leafAt(b uint64) *leaf {
	if t.root == nil {
		return nil
	}
	r, m, _ := split(b)
	if mid := t.root.mids[r]; mid != nil {
		return mid.leaves[m]
	}
	return nil
}

func (lf *leaf) get(i uint64) uint32 {
	if lf.bits == nil {
		r := lf.runs
		lo, hi := 0, len(r)
		for hi-lo > 1 {
			m := int(uint(lo+hi) >> 1)
			if uint64(r[m].start) <= i {
				lo = m
			} else {
				hi = m
			}
		}
		return r[lo].owner
	}
	w := uint64(lf.width)
	word := lf.bits[(i*w)>>6]
	idx := (word >> ((i * w) & 63)) & (1<<w - 1)
	return lf.pal[idx]
}

// mutableLeaf returns the leaf for block b owned by this version, creating or
// copying the path as needed.
func (t *tree) mutableLeaf(b uint64) *leaf {
	if t.root == nil {
		t.root = &rootNode{gen: t.gen}
	} else if t.root.gen != t.gen {
		c := *t.root
		c.gen = t.gen
		t.root = &c
	}
	r, m, _ := split(b)
	mid := t.root.mids[r]
	if mid == nil {
		mid = &midNode{gen: t.gen}
		t.root.mids[r] = mid
	} else if mid.gen != t.gen {
		c := *mid
		c.gen = t.gen
		mid = &c
		t.root.mids[r] = mid
	}
	lf := mid.leaves[m]
	if lf == nil {
		lf = &leaf{gen: t.gen, runs: []run{{0, 0}}}
		mid.leaves[m] = lf
	} else if lf.gen != t.gen {
		lf = lf.clone(t.gen)
		mid.leaves[m] = lf
	}
	return lf
}

func (lf *leaf) clone(gen uint64) *leaf {
	return &leaf{gen: gen, runs: append([]run(nil), lf.runs...), pal: append([]uint32(nil), lf.pal...),
		width: lf.width, bits: append([]uint64(nil), lf.bits...)}
}

// setRange sets the owner of blocks [start, end) to owner.
func (t *tree) setRange(start, end uint64, owner uint32) {
	for start < end {
		leafEnd := (start | (leafBlocks - 1)) + 1
		if leafEnd > end {
			leafEnd = end
		}
		lo, hi := start&(leafBlocks-1), (leafEnd-1)&(leafBlocks-1)+1
		if lo == 0 && hi == leafBlocks {
			t.setWholeLeaf(start, owner)
		} else {
			lf := t.mutableLeaf(start)
			lf.setRange(lo, hi, owner)
		}
		start = leafEnd
	}
}

func (t *tree) setWholeLeaf(b uint64, owner uint32) {
	lf := t.mutableLeaf(b)
	lf.runs = []run{{0, owner}}
	lf.pal, lf.width, lf.bits = nil, 0, nil
}

func (lf *leaf) setRange(lo, hi uint64, owner uint32) {
	if lf.bits == nil {
		lf.setRuns(lo, hi, owner)
		if len(lf.runs) > maxRuns {
			lf.toPacked()
		}
		return
	}
	idx := lf.paletteIndex(owner)
	w := uint64(lf.width)
	mask := uint64(1)<<w - 1
	for i := lo; i < hi; i++ {
		pos := i * w
		word := &lf.bits[pos>>6]
		*word = *word&^(mask<<(pos&63)) | uint64(idx)<<(pos&63)
	}
}

// setRuns sets [lo, hi) to owner in the run form.
func (lf *leaf) setRuns(lo, hi uint64, owner uint32) {
	var after uint32
	if hi < leafBlocks {
		after = lf.get(hi)
	}
	out := make([]run, 0, len(lf.runs)+2)
	add := func(start uint64, o uint32) {
		if n := len(out); n > 0 && out[n-1].owner == o {
			return
		}
		out = append(out, run{uint32(start), o})
	}
	for _, r := range lf.runs {
		if uint64(r.start) < lo {
			add(uint64(r.start), r.owner)
		}
	}
	add(lo, owner)
	if hi < leafBlocks {
		add(hi, after)
	}
	for _, r := range lf.runs {
		if uint64(r.start) > hi {
			add(uint64(r.start), r.owner)
		}
	}
	lf.runs = out
}

// toPacked converts a leaf from runs to the packed form.
func (lf *leaf) toPacked() {
	var pal []uint32
	index := map[uint32]uint32{}
	for _, r := range lf.runs {
		if _, ok := index[r.owner]; !ok {
			index[r.owner] = uint32(len(pal))
			pal = append(pal, r.owner)
		}
	}
	w := widthFor(len(pal))
	bits := newPacked(w)
	for k, r := range lf.runs {
		end := uint64(leafBlocks)
		if k+1 < len(lf.runs) {
			end = uint64(lf.runs[k+1].start)
		}
		for i := uint64(r.start); i < end; i++ {
			bits.put(w, i, index[r.owner])
		}
	}
	lf.runs, lf.pal, lf.width, lf.bits = nil, pal, w, bits
}

// paletteIndex returns owner's index, adding it (and widening) as needed.
func (lf *leaf) paletteIndex(owner uint32) uint32 {
	for i, o := range lf.pal {
		if o == owner {
			return uint32(i)
		}
	}
	if len(lf.pal) >= 1<<lf.width {
		lf.compact()
	}
	if len(lf.pal) >= 1<<lf.width {
		lf.repack(widthFor(len(lf.pal) + 1))
	}
	lf.pal = append(lf.pal, owner)
	return uint32(len(lf.pal) - 1)
}

func widthFor(n int) uint8 {
	for _, w := range []uint8{1, 2, 4, 8, 16} {
		if n <= 1<<w {
			return w
		}
	}
	panic("cow: leaf palette overflow")
}

// compact drops palette entries no block uses any more, so a leaf rewritten
// by many generations does not keep widening.
func (lf *leaf) compact() {
	used := make([]bool, len(lf.pal))
	for i := uint64(0); i < leafBlocks; i++ {
		used[lf.index(i)] = true
	}
	remap := make([]uint32, len(lf.pal))
	var pal []uint32
	for i, u := range used {
		if u {
			remap[i] = uint32(len(pal))
			pal = append(pal, lf.pal[i])
		}
	}
	if len(pal) == len(lf.pal) {
		return
	}
	w := widthFor(len(pal) + 1)
	n := newPacked(w)
	for i := uint64(0); i < leafBlocks; i++ {
		n.put(w, i, remap[lf.index(i)])
	}
	lf.pal, lf.width, lf.bits = pal, w, n
}

func (lf *leaf) index(i uint64) uint32 {
	w := uint64(lf.width)
	return uint32((lf.bits[(i*w)>>6] >> ((i * w) & 63)) & (1<<w - 1))
}

type packed []uint64

func newPacked(w uint8) packed { return make(packed, leafBlocks*uint64(w)/64) }

func (p packed) put(w uint8, i uint64, v uint32) {
	pos := i * uint64(w)
	p[pos>>6] |= uint64(v) << (pos & 63)
}

func (lf *leaf) repack(w uint8) {
	n := newPacked(w)
	for i := uint64(0); i < leafBlocks; i++ {
		n.put(w, i, lf.index(i))
	}
	lf.width, lf.bits = w, n
}

// forEachLeaf calls fn for every present leaf with the first block it covers.
func (t *tree) forEachLeaf(fn func(base uint64, lf *leaf)) {
	if t.root == nil {
		return
	}
	for r, mid := range t.root.mids {
		if mid == nil {
			continue
		}
		for m, lf := range mid.leaves {
			if lf != nil {
				fn(uint64(r)<<(leafShift+midShift)|uint64(m)<<leafShift, lf)
			}
		}
	}
}

// countOwned counts blocks in [0, limit) whose owner satisfies keep.
func (t *tree) countOwned(limit uint64, keep func(uint32) bool) uint64 {
	var n uint64
	t.forEachLeaf(func(base uint64, lf *leaf) {
		if base >= limit {
			return
		}
		end := uint64(leafBlocks)
		if limit-base < end {
			end = limit - base
		}
		if lf.bits == nil {
			for k, r := range lf.runs {
				rend := uint64(leafBlocks)
				if k+1 < len(lf.runs) {
					rend = uint64(lf.runs[k+1].start)
				}
				if uint64(r.start) < end && keep(r.owner) {
					n += min(rend, end) - uint64(r.start)
				}
			}
			return
		}
		for i := uint64(0); i < end; i++ {
			if keep(lf.get(i)) {
				n++
			}
		}
	})
	return n
}

// memory adds up the bytes of the nodes of this version not already in seen,
// so summing over many versions counts shared nodes once.
func (t *tree) memory(seen map[any]bool) int64 {
	if t.root == nil {
		return 0
	}
	var n int64
	if !seen[t.root] {
		seen[t.root] = true
		n += rootFanout*8 + 16
	}
	for _, mid := range t.root.mids {
		if mid == nil || seen[mid] {
			continue
		}
		seen[mid] = true
		n += midFanout*8 + 16
		for _, lf := range mid.leaves {
			if lf == nil || seen[lf] {
				continue
			}
			seen[lf] = true
			n += 80 + int64(cap(lf.runs))*8 + int64(cap(lf.pal))*4 + int64(cap(lf.bits))*8
		}
	}
	return n
}

// relabel gives every block owned by a number in from to owner to instead.
// Leaves this version does not own are copied, as by any change.
func (t *tree) relabel(from map[uint32]bool, to uint32) {
	var bases []uint64
	t.forEachLeaf(func(base uint64, lf *leaf) {
		if lf.hasOwnerIn(from) {
			bases = append(bases, base)
		}
	})
	for _, b := range bases {
		t.mutableLeaf(b).relabel(from, to)
	}
}

func (lf *leaf) hasOwnerIn(set map[uint32]bool) bool {
	owners := lf.pal
	if lf.bits == nil {
		for _, r := range lf.runs {
			if set[r.owner] {
				return true
			}
		}
		return false
	}
	for _, o := range owners {
		if set[o] {
			return true
		}
	}
	return false
}

func (lf *leaf) relabel(from map[uint32]bool, to uint32) {
	if lf.bits == nil {
		out := lf.runs[:0]
		for _, r := range lf.runs {
			if from[r.owner] {
				r.owner = to
			}
			if n := len(out); n > 0 && out[n-1].owner == r.owner {
				continue
			}
			out = append(out, r)
		}
		lf.runs = out
		return
	}
	// One palette entry per owner, as paletteIndex keeps it.
	index := map[uint32]uint32{}
	remap := make([]uint32, len(lf.pal))
	var pal []uint32
	for i, o := range lf.pal {
		if from[o] {
			o = to
		}
		j, ok := index[o]
		if !ok {
			j = uint32(len(pal))
			index[o] = j
			pal = append(pal, o)
		}
		remap[i] = j
	}
	w := widthFor(len(pal) + 1)
	n := newPacked(w)
	for i := uint64(0); i < leafBlocks; i++ {
		n.put(w, i, remap[lf.index(i)])
	}
	lf.pal, lf.width, lf.bits = pal, w, n
}
