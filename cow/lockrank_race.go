//go:build race

package cow

import (
	"bytes"
	"fmt"
	"runtime"
	"strconv"
	"sync/atomic"
)

// The order check of the ranked locks (lockrank.go), in race builds only.

func (m *rankedMutex[R]) Lock() {
	var r R
	acquireRank(r.rank())
	m.Mutex.Lock()
}

func (m *rankedMutex[R]) Unlock() {
	var r R
	m.Mutex.Unlock()
	releaseRank(r.rank())
}

func (m *rankedRWMutex[R]) Lock() {
	var r R
	acquireRank(r.rank())
	m.RWMutex.Lock()
}

func (m *rankedRWMutex[R]) Unlock() {
	var r R
	m.RWMutex.Unlock()
	releaseRank(r.rank())
}

func (m *rankedRWMutex[R]) RLock() {
	var r R
	acquireRank(r.rank())
	m.RWMutex.RLock()
}

func (m *rankedRWMutex[R]) RUnlock() {
	var r R
	m.RWMutex.RUnlock()
	releaseRank(r.rank())
}

// rankSlots holds, for each goroutine that holds ranked locks, the set of
// ranks it holds (bit r for rank r). A goroutine's slot is number goid mod
// len(rankSlots); it claims the slot (gid, by compare-and-swap) while it
// holds any ranked lock, and only the claimer touches held. A goroutine
// whose slot another one holds goes unchecked until it can claim it: held
// never names a rank its claimer does not hold, so every panic is a real
// breach of the order. A table rather than a map under a mutex: one lock
// shared by every goroutine around every ranked lock would order their
// memory accesses for the race detector and hide the races it looks for.
var rankSlots [1 << 16]struct {
	gid  atomic.Int64
	held uint64
}

func acquireRank(r lockRank) {
	g := goid()
	s := &rankSlots[g%int64(len(rankSlots))]
	if s.gid.Load() != g && !s.gid.CompareAndSwap(0, g) {
		return // another goroutine's slot: unchecked
	}
	if s.held>>r != 0 {
		panic(fmt.Sprintf("cow: lock order: taking a lock of rank %d while holding ranks %s (lockrank.go)", r, rankList(s.held)))
	}
	s.held |= 1 << r
}

func releaseRank(r lockRank) {
	g := goid()
	s := &rankSlots[g%int64(len(rankSlots))]
	if s.gid.Load() != g {
		return // taken unchecked
	}
	s.held &^= 1 << r
	if s.held == 0 {
		s.gid.Store(0)
	}
}

func rankList(held uint64) string {
	var b []byte
	for r := 0; r < 64; r++ {
		if held&(1<<r) != 0 {
			if len(b) > 0 {
				b = append(b, ',')
			}
			b = strconv.AppendInt(b, int64(r), 10)
		}
	}
	return string(b)
}

// goid returns the calling goroutine's id, from the first line of its
// stack trace ("goroutine 123 [running]:").
func goid() int64 {
	var buf [64]byte
	b := buf[:runtime.Stack(buf[:], false)]
	b = bytes.TrimPrefix(b, []byte("goroutine "))
	if i := bytes.IndexByte(b, ' '); i > 0 {
		b = b[:i]
	}
	id, err := strconv.ParseInt(string(b), 10, 64)
	if err != nil {
		panic("cow: lock order: no goroutine id in " + strconv.Quote(string(buf[:])))
	}
	return id
}
