package cow

import "sync"

// Lock order.
//
// A goroutine takes the ranked locks below in increasing rank, and never
// takes one while it holds one of the same or a higher rank (so never two
// locks of one rank at once, of one layer or of two):
//
//	1 layer.ioMu     the data files' lifetime: reads shared, close exclusive
//	2 layer.filesMu  creating the layer's files, the O_DIRECT twin
//	3 layer.flushMu  journal appends and flushes
//	4 layer.treeMu   the index, the locations and the pending records
//	5 layer.growMu   growing the data file ahead of its appends
//	6 locArena.mu    the store's location arena (locations change under treeMu)
//
// The store's and the volumes' locks (Store.gcMu, then Store.topo, then
// volume.barrier, then the volume's stripe locks) come before all of these
// and are not ranked. Locks of other kinds (the catalog's, the gc queue's)
// are never held while a ranked lock is taken.
//
// In builds with the race tag (go test -race) the ranked lock types check
// the order and panic when a goroutine breaks it (lockrank_race.go). In
// other builds they are sync.Mutex and sync.RWMutex with their methods
// promoted: no field, no check, no cost. A ranked lock must be unlocked by
// the goroutine that locked it, and has no TryLock.

// lockRank is a ranked lock's place in the order above.
type lockRank int

const (
	rankIO lockRank = 1 + iota
	rankFiles
	rankFlush
	rankTree
	rankGrow
	rankArena
)

// ranker names a rank by a type, so that a lock's rank is part of its type
// and takes no field.
type ranker interface{ rank() lockRank }

type (
	ioRank    struct{}
	filesRank struct{}
	flushRank struct{}
	treeRank  struct{}
	growRank  struct{}
	arenaRank struct{}
)

func (ioRank) rank() lockRank    { return rankIO }
func (filesRank) rank() lockRank { return rankFiles }
func (flushRank) rank() lockRank { return rankFlush }
func (treeRank) rank() lockRank  { return rankTree }
func (growRank) rank() lockRank  { return rankGrow }
func (arenaRank) rank() lockRank { return rankArena }

// rankedMutex is a sync.Mutex of rank R.
type rankedMutex[R ranker] struct{ sync.Mutex }

// rankedRWMutex is a sync.RWMutex of rank R.
type rankedRWMutex[R ranker] struct{ sync.RWMutex }
