package cow

import (
	"bytes"
	"errors"
	"sync"
	"testing"
)

// Finding 10: the layer's data and journal descriptors were used outside
// their lifetime guard (ioMu): fdatasync in flush, fallocate in punch,
// cachestat in recheckCache. A layer closed in between (a removal, the
// store's Close) gave its descriptor numbers back, and the next file opened
// could get them, so the call reached another file. Once a layer is
// closed, these must fail or do nothing, and touch no descriptor.
func TestLayerFilesNotUsedAfterClose(t *testing.T) {
	ctx := t.Context()
	dir := t.TempDir()
	s, err := Open(dir, Options{NoBackgroundMerge: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.CreateVolume(ctx, VolumeSpec{ID: "v", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	h, err := s.OpenVolume(ctx, "v")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.WriteAt(bytes.Repeat([]byte{1}, 2*BlockSize), 0); err != nil {
		t.Fatal(err)
	}
	l := h.v.head.Load()
	l.close()
	if err := l.flush(s.layerFS); !errors.Is(err, ErrClosed) {
		t.Errorf("flush of a closed layer: %v, want ErrClosed (no fdatasync of a descriptor given back)", err)
	}
	if err := l.punch(0, 1); !errors.Is(err, ErrClosed) {
		t.Errorf("punch in a closed layer: %v, want ErrClosed (no fallocate on a descriptor given back)", err)
	}
	l.mayCache.Store(true)
	l.recheckCache()
	if !l.mayCache.Load() {
		t.Error("recheckCache of a closed layer asked cachestat about a descriptor given back")
	}
}

// Close of the store races flushes and discards of an open volume: under
// -race, nothing may touch a layer's files without its guard, and every
// call returns nil or ErrClosed.
func TestStoreCloseRacesFlushAndDiscard(t *testing.T) {
	ctx := t.Context()
	for round := range 20 {
		s, err := Open(t.TempDir(), Options{NoBackgroundMerge: true})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.CreateVolume(ctx, VolumeSpec{ID: "v", Size: 1 << 20}); err != nil {
			t.Fatal(err)
		}
		h, err := s.OpenVolume(ctx, "v")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := h.WriteAt(bytes.Repeat([]byte{2}, 64*BlockSize), 0); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		errs := make(chan error, 1000)
		start := make(chan struct{})
		for g := range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				for i := range 50 {
					var err error
					if g == 0 {
						err = h.Flush()
					} else {
						err = h.Discard(int64(i%64)*BlockSize, BlockSize)
					}
					if err != nil {
						errs <- err
						return
					}
				}
			}()
		}
		close(start)
		if err := s.Close(); err != nil && !errors.Is(err, ErrClosed) {
			t.Fatalf("round %d: Close: %v", round, err)
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if !errors.Is(err, ErrClosed) {
				t.Errorf("round %d: flush or discard racing Close: %v, want nil or ErrClosed", round, err)
			}
		}
	}
}
