package cow

import "testing"

// TestLockRanks: the ranks of the lock types are the order lockrank.go
// gives, one rank each.
func TestLockRanks(t *testing.T) {
	got := []lockRank{ioRank{}.rank(), filesRank{}.rank(), flushRank{}.rank(), treeRank{}.rank(), growRank{}.rank(), arenaRank{}.rank()}
	for i, r := range got {
		if r != lockRank(i+1) {
			t.Fatalf("rank %d of the order is %d", i+1, r)
		}
	}
}
