package driver

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/cow"
)

// The ioctls, for tests that freeze a filesystem of their own (the test
// process serves the FUSE files, and it is not killed).
const (
	testFIFREEZE = 0xC0045877
	testFITHAW   = 0xC0045878
)

// freezeHere freezes the filesystem mounted at path from the test process
// and returns its thaw.
func freezeHere(path string) (thaw func() error, err error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	if err := unix.IoctlSetInt(fd, testFIFREEZE, 0); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("freeze %s: %w", path, err)
	}
	var once sync.Once
	var terr error
	return func() error {
		once.Do(func() {
			terr = unix.IoctlSetInt(fd, testFITHAW, 0)
			unix.Close(fd)
		})
		return terr
	}, nil
}

// frozenFD reports whether the filesystem of the open descriptor fd is
// frozen: FIFREEZE answers EBUSY then. If it freezes, it is thawed at once
// (the test owns that filesystem).
func frozenFD(t testing.TB, fd int) bool {
	t.Helper()
	err := unix.IoctlSetInt(fd, testFIFREEZE, 0)
	switch {
	case err == nil:
		if err := unix.IoctlSetInt(fd, testFITHAW, 0); err != nil {
			t.Errorf("thawing the probe freeze: %v", err)
		}
		return false
	case errors.Is(err, unix.EBUSY):
		return true
	}
	// A frozen filesystem answers EBUSY before anything else; EIO or
	// EROFS means the freeze was tried and failed on a dead device, so
	// it is not frozen. Any other error means the probe could not run,
	// which would pass every "not frozen" check.
	if errors.Is(err, unix.EIO) || errors.Is(err, unix.EROFS) {
		t.Logf("FIFREEZE probe: %v (not frozen)", err)
		return false
	}
	t.Errorf("FIFREEZE probe: %v", err)
	return false
}

// isFrozen is frozenFD for the filesystem mounted at path.
func isFrozen(t testing.TB, path string) bool {
	t.Helper()
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("open %s: %v", path, err)
	}
	defer unix.Close(fd)
	return frozenFD(t, fd)
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t testing.TB, what string, within time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, within)
		}
		time.Sleep(20 * time.Millisecond) // polling kernel and driver state
	}
}

// gate blocks the calls that pass it while closed.
type gate struct {
	mu      sync.Mutex
	block   chan struct{} // nil: open
	entered chan struct{} // closed when a call first waits
}

// close makes calls wait until open.
func (g *gate) close() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.block, g.entered = make(chan struct{}), make(chan struct{})
}

func (g *gate) open() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.block != nil {
		close(g.block)
		g.block = nil
	}
}

// waiting returns a channel closed once a call waits at the closed gate.
func (g *gate) waiting() <-chan struct{} {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.entered
}

func (g *gate) pass() {
	g.mu.Lock()
	block, entered := g.block, g.entered
	if block != nil {
		select {
		case <-entered:
		default:
			close(entered)
		}
	}
	g.mu.Unlock()
	if block != nil {
		<-block
	}
}

// gatedEngine lets a test hold engine snapshots and the writes and flushes
// that the FUSE files pass to volumes.
type gatedEngine struct {
	Engine
	snapshots, writes, flushes passer
	// panicking makes CreateSnapshot panic (after its gate).
	panicking atomic.Bool
}

// passer is a gate: pass returns when the gate is open.
type passer interface{ pass() }

func newGatedDeps() (Deps, *gatedEngine) {
	return gatedDeps(&gate{}, &gate{}, &gate{})
}

func gatedDeps(snapshots, writes, flushes passer) (Deps, *gatedEngine) {
	deps := DefaultDeps()
	g := &gatedEngine{snapshots: snapshots, writes: writes, flushes: flushes}
	deps.OpenEngine = func(dir string) (Engine, error) {
		e, err := OpenCowEngine(dir)
		if err != nil {
			return nil, err
		}
		g.Engine = e
		return g, nil
	}
	return deps, g
}

func (g *gatedEngine) CreateSnapshot(ctx context.Context, spec cow.SnapshotSpec) (cow.SnapshotInfo, error) {
	g.snapshots.pass()
	if g.panicking.Load() {
		panic("engine snapshot panics (test)")
	}
	return g.Engine.CreateSnapshot(ctx, spec)
}

func (g *gatedEngine) OpenVolume(ctx context.Context, id string) (OpenVolume, error) {
	v, err := g.Engine.OpenVolume(ctx, id)
	if err != nil {
		return nil, err
	}
	return gatedVolume{OpenVolume: v, g: g}, nil
}

// gatedVolume hides the engine's fast paths, so every write and flush goes
// through WriteAt and Flush.
type gatedVolume struct {
	OpenVolume
	g *gatedEngine
}

func (v gatedVolume) WriteAt(p []byte, off int64) (int, error) {
	v.g.writes.pass()
	return v.OpenVolume.WriteAt(p, off)
}

func (v gatedVolume) Flush() error {
	v.g.flushes.pass()
	return v.OpenVolume.Flush()
}
