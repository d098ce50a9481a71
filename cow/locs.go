package cow

import (
	"fmt"
	"math"
	"slices"
	"sort"
	"unsafe"

	"github.com/cowcsi/cowcsi/cow/internal/ondisk"
)

// Dense layers and where their blocks are.
//
// A layer appends each block it comes to own to the end of its data file
// and keeps the block's file position in a locMap: the file holds the
// layer's blocks back to back, however scattered they are in the volume.
// Keeping block b at byte b*BlockSize of a sparse file instead (the
// identity layout of pre-release builds) gave a layer file written at
// random one ext4 extent per block, and reads through deep chains paid for
// those extent trees (docs/DECISIONS.md, "Dense layer files").
//
// A block's location is chosen when the layer first comes to own it and
// stays: rewrites go in place. The exceptions are blocks owned as zeros (a
// discard, or zeros a merge brought in), which have no data until written.

// locExt is a run of blocks of one leaf (start, relative to the leaf) whose
// data lies back to back in the file from file block loc (zeroLoc: they
// read as zeros and have no data).
//
// Eight bytes: 16-bit start and count within a leaf of leafBlocks, and a
// 32-bit file block (maxFileBlocks: ext4's own limit on a file of 4 KiB
// blocks); random 4 KiB writes take one extent a block, so its size is
// the location map's memory per block (docs/DECISIONS.md, "8-byte location
// extents").
type locExt struct {
	start, count uint16
	loc          uint32 // zeroLoc: no data, reads as zeros
}

const (
	zeroLoc = math.MaxUint32
	// maxFileBlocks bounds a layer's data file: file blocks are
	// below it.
	maxFileBlocks = zeroLoc
)

// A leaf's block numbers and counts fit the 16-bit fields.
var _ [math.MaxUint16 - leafBlocks]struct{}

func (e locExt) first() uint32 { return uint32(e.start) }
func (e locExt) end() uint32   { return uint32(e.start) + uint32(e.count) }

// locAt returns the location of block i of the extent's leaf, i in it.
func (e locExt) locAt(i uint32) uint64 {
	if e.loc == zeroLoc {
		return ondisk.LocZero
	}
	return uint64(e.loc) + uint64(i-e.first())
}

// fitsLocs reports whether a journal record's file blocks can be held in a
// locMap: zeros, or blocks below maxFileBlocks. Replay and Check refuse
// records that do not (a corrupt journal; alloc never hands them out).
func fitsLocs(r ondisk.Range) bool {
	return r.Loc == ondisk.LocZero || (r.Loc < maxFileBlocks && r.Count <= maxFileBlocks-r.Loc)
}

// packLoc is loc as stored in a locExt; loc is ondisk.LocZero or below
// maxFileBlocks (alloc and the journal's replay see to it).
func packLoc(loc uint64) uint32 {
	if loc == ondisk.LocZero {
		return zeroLoc
	}
	if loc >= maxFileBlocks {
		panic(fmt.Sprintf("cow: file block %d beyond a dense layer's limit", loc))
	}
	return uint32(loc)
}

// locMap maps the blocks a layer owns to their locations, in sorted
// extent lists per index leaf (leafBlocks blocks). Blocks written one after
// the other take one extent; random 4 KiB writes take one each (8 bytes).
// A leaf of more than arenaMinExts extents keeps them in the arena, if the
// map has one (arena.go). The zero value is empty and keeps everything on
// the heap. The layer's treeMu guards it.
type locMap struct {
	leaves map[uint64]leafLocs
	blocks uint64 // blocks mapped
	arena  *locArena
}

// leafLocs is a leaf's extents, on the heap or in an arena slot (whose
// class the slice's capacity gives).
type leafLocs struct {
	exts    []locExt
	slot    arenaSlot
	inArena bool // 32 bytes in all
}

// class is the arena class of an arena leaf's slot.
func (lf leafLocs) class() int { return arenaClass(cap(lf.exts)) }

// get returns the location of block b and how many blocks from b on (b
// included, to the end of its leaf at most) follow it in the file, or are
// zeros with it; ok is false if b has no location, and n then counts the
// blocks from b on without one (to the end of the leaf at most).
func (m *locMap) get(b uint64) (loc, n uint64, ok bool) {
	exts := m.leaves[b>>leafShift].exts
	i := uint32(b & (leafBlocks - 1))
	k := sort.Search(len(exts), func(k int) bool { return exts[k].end() > i })
	if k == len(exts) {
		return 0, uint64(leafBlocks - i), false
	}
	if exts[k].first() > i {
		return 0, uint64(exts[k].first() - i), false
	}
	e := exts[k]
	return e.locAt(i), uint64(e.end() - i), true
}

// unmapped counts the blocks of [start, start+count) without a location.
func (m *locMap) unmapped(start, count uint64) uint64 {
	var mapped uint64
	for b, end := start, start+count; b < end; {
		leafEnd := min(end, (b|(leafBlocks-1))+1)
		lo, hi := uint32(b&(leafBlocks-1)), uint32((leafEnd-1)&(leafBlocks-1))+1
		for _, e := range m.leaves[b>>leafShift].exts {
			if s, t := max(e.first(), lo), min(e.end(), hi); s < t {
				mapped += uint64(t - s)
			}
		}
		b = leafEnd
	}
	return count - mapped
}

// set gives blocks [start, start+count) the locations loc, loc+1, ... (or
// all ondisk.LocZero), replacing what they had.
func (m *locMap) set(start, count, loc uint64) {
	if m.leaves == nil {
		m.leaves = map[uint64]leafLocs{}
	}
	m.blocks += m.unmapped(start, count)
	for b, end := start, start+count; b < end; {
		leafEnd := min(end, (b|(leafBlocks-1))+1)
		lo, hi := uint32(b&(leafBlocks-1)), uint32((leafEnd-1)&(leafBlocks-1))+1
		key := b >> leafShift
		lf := m.room(m.leaves[key])
		lf.exts = setExts(lf.exts, locExt{start: uint16(lo), count: uint16(hi - lo), loc: packLoc(loc)})
		m.leaves[key] = m.fit(lf)
		if loc != ondisk.LocZero {
			loc += leafEnd - b
		}
		b = leafEnd
	}
}

// room makes sure a leaf's extents can take one set (setExts adds two
// extents at most) in place: a leaf outgrowing arenaMinExts moves to the
// arena, an arena leaf outgrowing its slot to a larger one. Where the
// arena cannot give a slot, the extents grow on the heap.
func (m *locMap) room(lf leafLocs) leafLocs {
	need := min(len(lf.exts)+2, leafBlocks)
	if cap(lf.exts) >= need || !lf.inArena && (need <= arenaMinExts || m.arena == nil) {
		return lf
	}
	return m.move(lf, need)
}

// fit gives an arena leaf that shrank (a discard or merge made its
// extents one) a smaller slot, or the heap back.
func (m *locMap) fit(lf leafLocs) leafLocs {
	if !lf.inArena {
		return lf
	}
	n := len(lf.exts)
	if n <= arenaMinExts/2 || 4*(n+2) <= cap(lf.exts) {
		return m.move(lf, 2*n)
	}
	return lf
}

// move copies a leaf's extents to a slot for capacity want (at least its
// length; the heap if want is within arenaMinExts or the arena has no
// slot) and frees the slot they were in.
func (m *locMap) move(lf leafLocs, want int) leafLocs {
	want = max(min(want, leafBlocks), len(lf.exts))
	var to leafLocs
	if want > arenaMinExts {
		c := arenaClass(want)
		if s, exts, ok := m.arena.alloc(c); ok {
			to = leafLocs{exts: exts, slot: s, inArena: true}
		}
	}
	if !to.inArena {
		if want > arenaMinExts {
			want = min(2*want, leafBlocks) // grown by doubling, as append would
		}
		to.exts = make([]locExt, 0, want)
	}
	to.exts = append(to.exts, lf.exts...)
	if lf.inArena {
		m.arena.release(lf.slot, lf.class())
	}
	return to
}

// release gives the map's arena slots back and empties it; the layer is
// closed and its map never used again.
func (m *locMap) release() {
	for _, lf := range m.leaves {
		if lf.inArena {
			m.arena.release(lf.slot, lf.class())
		}
	}
	m.leaves, m.blocks = nil, 0
}

// setExts puts n into the sorted extents exts, cutting what it overlaps,
// and merges it with neighbours that continue it.
func setExts(exts []locExt, n locExt) []locExt {
	i := sort.Search(len(exts), func(k int) bool { return exts[k].end() > n.first() })
	j := sort.Search(len(exts), func(k int) bool { return exts[k].first() >= n.end() })
	repl := make([]locExt, 0, 3)
	if i < j && exts[i].first() < n.first() {
		l := exts[i]
		l.count = n.start - l.start
		repl = append(repl, l)
	}
	repl = append(repl, n)
	if i < j && exts[j-1].end() > n.end() {
		r := exts[j-1]
		r.loc, r.start, r.count = packLoc(r.locAt(n.end())), uint16(n.end()), uint16(r.end()-n.end())
		repl = append(repl, r)
	}
	exts = slices.Replace(exts, i, j, repl...)
	// Merge around the new extent.
	from, to := max(i-1, 0), min(i+len(repl), len(exts)-1)
	for k := from; k < to && k+1 < len(exts); {
		if a, b := exts[k], exts[k+1]; a.end() == b.first() && continues(a, b) {
			exts[k].count += b.count
			exts = slices.Delete(exts, k+1, k+2)
			to--
			continue
		}
		k++
	}
	return exts
}

// continues reports whether b's blocks lie in the file right after a's,
// or both read as zeros.
func continues(a, b locExt) bool {
	if a.loc == zeroLoc || b.loc == zeroLoc {
		return a.loc == b.loc
	}
	return uint64(a.loc)+uint64(a.count) == uint64(b.loc)
}

// forEach calls fn for every extent, in block order.
func (m *locMap) forEach(fn func(start, count, loc uint64)) {
	keys := make([]uint64, 0, len(m.leaves))
	for k := range m.leaves {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		for _, e := range m.leaves[k].exts {
			fn(k<<leafShift+uint64(e.start), uint64(e.count), e.locAt(e.first()))
		}
	}
}

// end returns the file block after the last one any location uses.
func (m *locMap) end() uint64 {
	var end uint64
	for _, lf := range m.leaves {
		for _, e := range lf.exts {
			if e.loc != zeroLoc {
				end = max(end, uint64(e.loc)+uint64(e.count))
			}
		}
	}
	return end
}

// memory estimates the bytes the map holds on the heap, and in arena
// slots.
func (m *locMap) memory() (heap, arena int64) {
	heap = int64(len(m.leaves)) * 64
	for _, lf := range m.leaves {
		n := int64(cap(lf.exts)) * int64(unsafe.Sizeof(locExt{}))
		if lf.inArena {
			arena += n
		} else {
			heap += n
		}
	}
	return heap, arena
}
