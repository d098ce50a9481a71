//go:build race

//lint:file-ignore SA2001 the locks are taken for their order, not to guard anything

package cow

import (
	"strings"
	"testing"
)

// TestLockRankOrder: in race builds, the ranked locks take the order of
// lockrank.go and panic on a breach of it, before they block.
func TestLockRankOrder(t *testing.T) {
	a, b := newLayerStruct(1, 0, nil, nil), newLayerStruct(2, 0, nil, nil)
	var arena locArena

	// The whole order, shared and exclusive.
	a.ioMu.RLock()
	a.filesMu.Lock()
	a.flushMu.Lock()
	a.treeMu.Lock()
	a.growMu.Lock()
	arena.mu.Lock()
	arena.mu.Unlock()
	a.growMu.Unlock()
	a.treeMu.Unlock()
	a.flushMu.Unlock()
	a.filesMu.Unlock()
	a.ioMu.RUnlock()

	// One after the other, any order: nothing is held in between.
	a.treeMu.RLock()
	a.treeMu.RUnlock()
	b.ioMu.Lock()
	b.ioMu.Unlock()

	breach := func(name string, first func() (unlock func()), second func()) {
		t.Helper()
		unlock := first()
		defer unlock()
		defer func() {
			t.Helper()
			r := recover()
			if r == nil {
				t.Errorf("%s: no panic", name)
			} else if msg, _ := r.(string); !strings.Contains(msg, "lock order") {
				t.Errorf("%s: panic %v", name, r)
			}
		}()
		second()
		t.Errorf("%s: took the second lock", name)
	}
	breach("ioMu under treeMu", func() func() { a.treeMu.RLock(); return a.treeMu.RUnlock },
		func() { a.ioMu.RLock() })
	breach("filesMu under flushMu", func() func() { a.flushMu.Lock(); return a.flushMu.Unlock },
		func() { a.filesMu.Lock() })
	breach("treeMu of another layer", func() func() { a.treeMu.RLock(); return a.treeMu.RUnlock },
		func() { b.treeMu.RLock() })
	breach("treeMu under the arena", func() func() { arena.mu.Lock(); return arena.mu.Unlock },
		func() { a.treeMu.Lock() })

	// After the breaches, the locks are free and the order holds again.
	a.ioMu.Lock()
	a.treeMu.Lock()
	a.treeMu.Unlock()
	a.ioMu.Unlock()

	// Each goroutine has its own ranks.
	a.treeMu.RLock()
	done := make(chan struct{})
	go func() {
		defer close(done)
		b.ioMu.RLock()
		b.ioMu.RUnlock()
	}()
	<-done
	a.treeMu.RUnlock()
}
