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
}

func (l *stallingLoop) Attach(ctx context.Context, backing string, readOnly bool) (string, error) {
	if filepath.Base(backing) == l.stallName {
		close(l.attaching)
		<-ctx.Done()
		return "", ctx.Err()
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
