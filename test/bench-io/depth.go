package main

import (
	"context"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cowcsi/cowcsi/cow"
)

// warm returns a prep that drops the page cache of layers (the depth
// volumes' layer files) and then reads all of v through the engine, in 64
// KiB reads. The engine's reads from disk leave its page cache alone, so
// this does not put the data in memory: it maps every block of every layer
// file, so that the depth row compares both sides with the file system's
// metadata (the extent trees of the layer files) in memory and the data on
// disk; the cold depth row drops that too. Dropping the cache first keeps
// deepen's small (buffered) writes from leaving the deep side in memory.
// The reads run warmWorkers at a time: the deep volume's 64 KiB are 16
// blocks in 16 layer files (docs/DECISIONS.md, "bench-io: the depth row's
// warm-up").
func warm(dir string, layers []string, v *countingVolume, path string, size int64) func(context.Context, int) (string, func() error, error) {
	return func(context.Context, int) (string, func() error, error) {
		if err := dropCache(dir, layers); err != nil {
			return "", nil, err
		}
		const chunk = 64 << 10
		var next atomic.Int64
		var wg sync.WaitGroup
		errs := make(chan error, warmWorkers)
		for range warmWorkers {
			wg.Go(func() {
				buf := make([]byte, chunk)
				for {
					off := next.Add(chunk) - chunk
					if off >= size {
						return
					}
					if _, err := v.ReadAt(buf[:min(chunk, size-off)], off); err != nil {
						errs <- fmt.Errorf("warm %s: %w", path, err)
						return
					}
				}
			})
		}
		wg.Wait()
		close(errs)
		if err := <-errs; err != nil {
			return "", nil, err
		}
		// Both sides must read from disk: a cached copy of the data
		// would make the row compare memory with disk again.
		cached, total, err := cachedPages(layers)
		if err != nil {
			return "", nil, err
		}
		if cached > total/100 {
			return "", nil, fmt.Errorf("warm %s: %d of %d pages of the layer files cached after the drop and the warm", path, cached, total)
		}
		return path, nil, nil
	}
}

// warmWorkers is how many reads warm has in flight (fio's iodepth).
const warmWorkers = 32

// deepen makes the volume's chain depth layers deep, every layer owning an
// equal share of blocks spread over the whole volume: after each snapshot,
// the blocks whose hash picks this layer are rewritten with their own
// content (so fio's verify headers stay valid).
func deepen(ctx context.Context, st *cow.Store, v *countingVolume, id string, depth int) error {
	t0 := time.Now()
	blocks := uint64(v.Size() / cow.BlockSize)
	buf := make([]byte, cow.BlockSize)
	for k := 1; k < depth; k++ {
		if _, err := st.CreateSnapshot(ctx, cow.SnapshotSpec{ID: fmt.Sprintf("%s-%d", id, k), VolumeID: id}); err != nil {
			return err
		}
		for b := range blocks {
			if int((b*0x9E3779B97F4A7C15)>>32)%depth != k {
				continue
			}
			off := int64(b) * cow.BlockSize
			if _, err := v.ReadAt(buf, off); err != nil {
				return err
			}
			if _, err := v.WriteAt(buf, off); err != nil {
				return err
			}
		}
		if err := ctx.Err(); err != nil {
			return err
		}
	}
	if err := v.Flush(); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "deep volume: %d layers in %v\n", depth, time.Since(t0).Round(100*time.Millisecond))
	return nil
}
