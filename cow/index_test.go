package cow

import (
	"math/rand/v2"
	"testing"
)

// TestIndexAgainstArray checks the tree, both leaf forms and forking against
// plain arrays. A fork freezes the version it came from (as CreateSnapshot
// does): frozen versions must keep their content whatever is written later
// to the versions forked from them.
func TestIndexAgainstArray(t *testing.T) {
	seed := rand.Uint64()
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 1))
	const blocks = 3 * leafBlocks
	type version struct {
		t     tree
		model []uint32
	}
	live := []*version{{t: tree{gen: newGen()}, model: make([]uint32, blocks)}}
	var frozen []*version
	for step := range 2500 {
		v := live[rng.IntN(len(live))]
		switch rng.IntN(12) {
		case 0: // snapshot: v's current state freezes, v goes on as a fork
			frozen = append(frozen, &version{t: v.t, model: append([]uint32(nil), v.model...)})
			v.t = v.t.fork()
		case 1: // clone: a second live version from a frozen state of v
			frozen = append(frozen, &version{t: v.t, model: append([]uint32(nil), v.model...)})
			v.t = v.t.fork()
			live = append(live, &version{t: frozen[len(frozen)-1].t.fork(), model: append([]uint32(nil), v.model...)})
		default:
			start := uint64(rng.IntN(blocks))
			n := uint64(1 + rng.IntN(64))
			if rng.IntN(8) == 0 {
				n = uint64(rng.IntN(2 * leafBlocks))
			}
			end := min(start+n, blocks)
			owner := uint32(1 + rng.IntN(6))
			v.t.setRange(start, end, owner)
			for b := start; b < end; b++ {
				v.model[b] = owner
			}
		}
		if step%1000 == 0 {
			for _, v := range append(live, frozen...) {
				compare(t, v.t, v.model)
			}
		}
	}
	for _, v := range append(live, frozen...) {
		compare(t, v.t, v.model)
	}
}

func compare(t *testing.T, tr tree, model []uint32) {
	t.Helper()
	var owned uint64
	for b, want := range model {
		if got := tr.get(uint64(b)); got != want {
			t.Fatalf("block %d: got owner %d, want %d", b, got, want)
		}
		if want != 0 {
			owned++
		}
	}
	if n := tr.countOwned(uint64(len(model)), func(o uint32) bool { return o != 0 }); n != owned {
		t.Fatalf("countOwned %d, want %d", n, owned)
	}
}
