package driver

import (
	"context"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/cowcsi/cowcsi/cow/loopdev"
	"github.com/cowcsi/cowcsi/test/testutil"
)

// stallingLoop is the real loop devices, except that Attach of a backing
// file named stallName waits for its call's cancellation, and Sync waits
// for release once armed: an in-flight call and a shutdown sync that take
// as long as the kernel makes them.
type stallingLoop struct {
	LoopDevices
	stallName string
	attaching chan struct{} // closed when the stalled Attach started
	armed     atomic.Bool
	syncing   chan struct{} // closed when the first armed Sync started
	once      atomic.Bool
	release   chan struct{}
	// onAttach, if set, runs before every other Attach and returns the
	// context it proceeds with, or an error.
	onAttach func(ctx context.Context) (context.Context, error)
}

func (l *stallingLoop) Attach(ctx context.Context, backing string, readOnly bool) (string, error) {
	if l.stallName != "" && filepath.Base(backing) == l.stallName {
		close(l.attaching)
		<-ctx.Done()
		return "", ctx.Err()
	}
	if l.onAttach != nil {
		var err error
		if ctx, err = l.onAttach(ctx); err != nil {
			return "", err
		}
	}
	return l.LoopDevices.Attach(ctx, backing, readOnly)
}

func (l *stallingLoop) Sync(ctx context.Context, dev string) error {
	if l.armed.Load() {
		if !l.once.Swap(true) {
			close(l.syncing)
		}
		<-l.release
	}
	return l.LoopDevices.Sync(ctx, dev)
}

// TestStopWithinStopTimeout: with a call in flight that only ends when
// cancelled and a volume whose sync never ends, Run must still return
// within StopTimeout (the kubelet's SIGKILL follows the grace period).
func TestStopWithinStopTimeout(t *testing.T) {
	testutil.RequireRoot(t, nodeNeeds...)
	env := newTestEnv(t)
	opts := testOptions(env)
	opts.StopTimeout = 3 * time.Second
	deps := DefaultDeps()
	loop := &stallingLoop{LoopDevices: deps.Loop, stallName: volumeIDFor("stuck"),
		attaching: make(chan struct{}), syncing: make(chan struct{}), release: make(chan struct{})}
	deps.Loop = loop
	// Registered before the driver's own cleanup, so it runs after it:
	// the stalled sync returns once the test is over.
	t.Cleanup(func() { close(loop.release) })
	td := startDriverWith(t, opts, deps)
	ctx := context.Background()

	vc := blockCap(rwo)
	for _, name := range []string{"synced", "stuck"} {
		createVolume(t, td, &csi.CreateVolumeRequest{Name: name, VolumeCapabilities: []*csi.VolumeCapability{vc}})
	}
	staging := filepath.Join(env.root, "staging-synced")
	if _, err := td.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: volumeIDFor("synced"), StagingTargetPath: staging, VolumeCapability: vc}); err != nil {
		t.Fatal(err)
	}
	staged := make(chan error, 1)
	go func() {
		_, err := td.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: volumeIDFor("stuck"),
			StagingTargetPath: filepath.Join(env.root, "staging-stuck"), VolumeCapability: vc})
		staged <- err
	}()
	<-loop.attaching
	loop.armed.Store(true)

	// The driver's own cleanup finds its loops by their full path, which
	// the stop (FUSE mount detached) changes: note them now, clear after.
	left, _ := loopdev.BindingsUnder(opts.fuseDir())
	t.Cleanup(func() {
		for _, b := range left {
			if cur, err := loopdev.BackingFileOf(b.Path); err == nil && sameBacking(cur, b.BackingFile) {
				detachLoop(t, b.Path)
			}
		}
	})
	cancel := td.cancel
	td.cancel = nil // stopped here, not by the cleanup
	start := time.Now()
	cancel()
	bound := opts.StopTimeout + 2*time.Second // scheduling slack on a busy machine
	select {
	case err := <-td.done:
		took := time.Since(start)
		t.Logf("Run returned after %v: %v", took.Round(time.Millisecond), err)
		select {
		case <-loop.syncing:
		default:
			t.Errorf("the shutdown never synced the staged volume")
		}
		if err == nil {
			t.Errorf("Run returned no error with a volume left unsynced")
		}
	case <-time.After(bound):
		t.Fatalf("Run did not return within %v of the stop (StopTimeout %v)", bound, opts.StopTimeout)
	}
	td.conn.Close()
	if err := <-staged; err == nil {
		t.Errorf("the stalled NodeStageVolume succeeded")
	}
}

// stopDuringRecovery stages a block volume on a first instance and stops
// it, then runs a second on the same store whose recovery of that volume
// waits for the stop signal and then does onAttach; it sends the signal
// and returns how long Run took after it, and the volumes the node state
// records afterwards.
func stopDuringRecovery(t *testing.T, loop *stallingLoop, stopTimeout time.Duration,
	onAttach func(ctx context.Context) (context.Context, error)) (time.Duration, map[string]*stagedVolume) {
	testutil.RequireRoot(t, nodeNeeds...)
	env := newTestEnv(t)
	opts := testOptions(env)
	opts.StopTimeout = stopTimeout
	td := startDriverWith(t, opts, DefaultDeps())
	vc := blockCap(rwo)
	createVolume(t, td, &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: []*csi.VolumeCapability{vc}})
	if _, err := td.node.NodeStageVolume(context.Background(), &csi.NodeStageVolumeRequest{VolumeId: volumeIDFor("v"),
		StagingTargetPath: filepath.Join(env.root, "staging-v"), VolumeCapability: vc}); err != nil {
		t.Fatal(err)
	}
	td.stop(t)

	deps := DefaultDeps()
	loop.LoopDevices = deps.Loop
	signalled := make(chan struct{})
	loop.onAttach = func(ctx context.Context) (context.Context, error) {
		<-signalled
		return onAttach(ctx)
	}
	deps.Loop = loop
	d, err := New(opts, deps)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	t.Cleanup(func() {
		// A stopped instance leaves the volume's loop bound to the
		// file's short name: clear it.
		bound, _ := loopdev.Bindings()
		for _, b := range bound {
			if b.BackingFile == "/"+volumeIDFor("v") {
				detachLoop(t, b.Path)
			}
		}
	})
	// Signal once the recovery reached the volume (the FUSE mount is up).
	waitFor(t, "the second instance's FUSE mount", 30*time.Second, func() bool {
		m, _ := testutil.MountsUnder(opts.fuseDir())
		return len(m) > 0
	})
	start := time.Now()
	cancel()
	close(signalled)
	var took time.Duration
	select {
	case err := <-done:
		took = time.Since(start)
		t.Logf("Run returned %v after the signal: %v", took.Round(time.Millisecond), err)
	case <-time.After(stopTimeout + time.Minute):
		t.Fatalf("Run did not return within %v of the stop signal", stopTimeout+time.Minute)
	}
	vols, err := (stateFile{dir: opts.stateDir()}).load()
	if err != nil {
		t.Fatal(err)
	}
	return took, vols
}

// TestStopClockStartsAtSignal: a stop signal that arrives while the
// driver is still recovering volumes (that takes a while at scale) counts
// from the signal, not from the end of the recovery: Run returns within
// StopTimeout of the signal even when the recovery took most of it and the
// recovered volume's sync never ends.
func TestStopClockStartsAtSignal(t *testing.T) {
	const stopTimeout = 4 * time.Second
	loop := &stallingLoop{syncing: make(chan struct{}), release: make(chan struct{})}
	loop.armed.Store(true)
	t.Cleanup(func() { close(loop.release) })
	took, vols := stopDuringRecovery(t, loop, stopTimeout, func(ctx context.Context) (context.Context, error) {
		time.Sleep(stopTimeout * 3 / 4) // a slow recovery, not ordering
		return context.WithoutCancel(ctx), nil
	})
	if bound := stopTimeout + 1500*time.Millisecond; took > bound {
		t.Errorf("Run returned %v after the stop signal, want within %v (StopTimeout %v)", took, bound, stopTimeout)
	}
	if vols[volumeIDFor("v")] == nil {
		t.Errorf("the recovered volume is not in the node state after the stop")
	}
}

// TestStopDuringRecoveryKeepsVolumes: a volume whose recovery the stop
// signal cut short stays in the node state for the next instance.
// Forgotten, its kernel side would outlive every later NodeUnstageVolume.
func TestStopDuringRecoveryKeepsVolumes(t *testing.T) {
	loop := &stallingLoop{}
	_, vols := stopDuringRecovery(t, loop, 4*time.Second, func(ctx context.Context) (context.Context, error) {
		<-ctx.Done()
		return nil, ctx.Err()
	})
	if vols[volumeIDFor("v")] == nil {
		t.Errorf("the volume whose recovery the stop cut short is gone from the node state")
	}
}
