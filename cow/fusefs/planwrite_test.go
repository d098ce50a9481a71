package fusefs

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/cow"
	"github.com/cowcsi/cowcsi/cow/internal/blockio"
)

// countingVolume counts the write plans a cow.Volume made.
type countingVolume struct {
	*cow.Volume
	planned atomic.Int64
}

func (c *countingVolume) PlanWrite(p []byte, off int64) (*blockio.Plan, error) {
	pl, err := c.Volume.PlanWrite(p, off)
	if pl != nil {
		c.planned.Add(1)
	}
	return pl, err
}

// TestRingPlannedWritesAndSnapshots serves an engine volume over the ring
// while writers rewrite it with direct I/O (large writes the engine plans,
// small ones and those to blocks a snapshot left unowned through WriteAt)
// and snapshots are taken all the while. A planned write holds the volume's write barrier until
// the ring's thread completes it, and a snapshot waits for the barrier:
// if that thread ever waited for the barrier too, the writes and the
// snapshot would wait for each other forever.
// At the end every block must hold its last write.
func TestRingPlannedWritesAndSnapshots(t *testing.T) {
	s := mountRing(t, Options{})
	dir := t.TempDir()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	if st.Type == unix.TMPFS_MAGIC {
		t.Skip("no O_DIRECT on tmpfs: the engine plans no writes there")
	}
	store, err := cow.Open(dir, cow.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	ctx := context.Background()
	const size, writers = 16 << 20, 4
	if _, err := store.CreateVolume(ctx, cow.VolumeSpec{ID: "v", Size: size}); err != nil {
		t.Fatal(err)
	}
	vol, err := store.OpenVolume(ctx, "v")
	if err != nil {
		t.Fatal(err)
	}
	defer vol.Close()
	if _, err := vol.WriteAt(make([]byte, size), 0); err != nil {
		t.Fatal(err)
	}
	cv := &countingVolume{Volume: vol}
	add(t, s, "vol", cv, false)
	fd := openFile(t, s.Path("vol"), unix.O_RDWR|unix.O_DIRECT)

	// Each writer owns a region and remembers the generation it last
	// wrote to each of its blocks (stamped into the block). Every other
	// write is one block, the others are 256 KiB.
	const region = size / writers
	const blocks = region / 4096
	const bigBlocks = 64
	last := make([][]uint64, writers)
	var snaps atomic.Int64
	// After a deadlock nothing would end, not even the unmount: fail
	// the whole test binary, with every goroutine's stack.
	deadlock := time.AfterFunc(30*time.Second, func() {
		panic("writes with snapshots still running after 30 s: the ring's thread and a snapshot wait for each other")
	})
	err = func() error {
		stop := make(chan struct{})
		errs := make(chan error, writers+2)
		var wg sync.WaitGroup
		for w := range writers {
			last[w] = make([]uint64, blocks)
			wg.Go(func() {
				big := alignedBlocks(bigBlocks)
				rng := rand.New(rand.NewPCG(uint64(w), 7))
				for gen := uint64(1); ; gen++ {
					select {
					case <-stop:
						return
					default:
					}
					n := 1
					if gen%2 == 0 {
						n = bigBlocks
					}
					b := rng.IntN(blocks/n) * n
					off := int64(w*region + b*4096)
					buf := big[:n*4096]
					stamp(buf, off, gen)
					if got, err := unix.Pwrite(fd, buf, off); err != nil || got != len(buf) {
						errs <- fmt.Errorf("pwrite at %d: %d, %v", off, got, err)
						return
					}
					for k := range n {
						last[w][b+k] = gen
					}
				}
			})
		}
		wg.Go(func() {
			buf := alignedBlocks(1)
			rng := rand.New(rand.NewPCG(99, 7))
			for {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := unix.Pread(fd, buf, int64(rng.IntN(size/4096))*4096); err != nil {
					errs <- fmt.Errorf("pread: %v", err)
					return
				}
			}
		})
		wg.Go(func() {
			for k := 0; ; k++ {
				select {
				case <-stop:
					return
				case <-time.After(10 * time.Millisecond):
				}
				if _, err := store.CreateSnapshot(ctx, cow.SnapshotSpec{ID: fmt.Sprintf("s%d", k), VolumeID: "v"}); err != nil {
					errs <- err
					return
				}
				snaps.Add(1)
			}
		})
		time.Sleep(2 * time.Second)
		close(stop)
		wg.Wait()
		close(errs)
		return <-errs
	}()
	deadlock.Stop()
	if err != nil {
		t.Fatal(err)
	}
	if cv.planned.Load() == 0 || snaps.Load() == 0 {
		t.Fatalf("%d planned writes, %d snapshots: the test did not test both", cv.planned.Load(), snaps.Load())
	}
	got := make([]byte, size)
	if _, err := vol.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	want := alignedBlocks(1)
	for w := range writers {
		for b, gen := range last[w] {
			off := int64(w*region + b*4096)
			if gen == 0 {
				clear(want)
			} else {
				stamp(want, off, gen)
			}
			if !bytes.Equal(got[off:off+4096], want) {
				t.Fatalf("block at %d: not its last write (generation %d)", off, gen)
			}
		}
	}
	// Large planned writes come from the entries' payloads, registered
	// as fixed buffers on first use.
	if s.ring.fixedIO.Load() == 0 {
		t.Error("no write was submitted from a fixed buffer")
	}
	t.Logf("%d planned writes (%d from fixed buffers), %d snapshots", cv.planned.Load(), s.ring.fixedIO.Load(), snaps.Load())
}

// alignedBlocks is a page-aligned buffer of n 4 KiB blocks (O_DIRECT).
func alignedBlocks(n int) []byte {
	b := make([]byte, (n+1)*4096)
	k := int(-uintptr(unsafe.Pointer(&b[0])) & 4095)
	return b[k : k+n*4096]
}

// stamp fills buf, written at off, with a pattern of each block's offset
// and gen.
func stamp(buf []byte, off int64, gen uint64) {
	for i := 0; i < len(buf); i += 16 {
		binary.LittleEndian.PutUint64(buf[i:], uint64(off)+uint64(i&^4095))
		binary.LittleEndian.PutUint64(buf[i+8:], gen)
	}
}
