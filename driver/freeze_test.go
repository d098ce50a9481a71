package driver

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cowcsi/cowcsi/cow"
	"github.com/cowcsi/cowcsi/test/testutil"
)

// startGatedDriver starts a driver whose engine snapshots, volume writes
// and volume flushes a test can hold, with the given freeze timeout.
func startGatedDriver(t *testing.T, freezeTimeout time.Duration) (*testEnv, *testDriver, *gatedEngine) {
	t.Helper()
	testutil.RequireRoot(t, nodeNeeds...)
	env := newTestEnv(t)
	deps, g := newGatedDeps()
	opts := testOptions(env)
	opts.FreezeTimeout = freezeTimeout
	// Nothing may stay held when the test ends, whatever failed.
	t.Cleanup(func() {
		for _, p := range []passer{g.snapshots, g.writes, g.flushes} {
			p.(*gate).open()
		}
	})
	return env, startDriverWith(t, opts, deps), g
}

func gateOf(p passer) *gate { return p.(*gate) }

// fsopChildren lists this process's fsop children doing op.
func fsopChildren(t testing.TB, op string) []int {
	t.Helper()
	tasks, _ := filepath.Glob("/proc/self/task/*/children")
	var out []int
	for _, f := range tasks {
		b, _ := os.ReadFile(f)
		for _, p := range strings.Fields(string(b)) {
			cmd, _ := os.ReadFile("/proc/" + p + "/cmdline")
			if string(cmd) == "cowcsi-fsop\x00"+op+"\x00" {
				pid, _ := strconv.Atoi(p)
				out = append(out, pid)
			}
		}
	}
	return out
}

// snapshotAsync starts CreateSnapshot and returns its outcome's channel.
func snapshotAsync(td *testDriver, name, src string) <-chan error {
	ch := make(chan error, 1)
	go func() {
		_, err := td.ctrl.CreateSnapshot(context.Background(), &csi.CreateSnapshotRequest{Name: name, SourceVolumeId: src})
		ch <- err
	}()
	return ch
}

func wantNoSnapshot(t *testing.T, td *testDriver, name string) {
	t.Helper()
	if _, err := td.d.engine.GetSnapshot(snapshotIDFor(name)); !errors.Is(err, cow.ErrNotFound) {
		t.Errorf("snapshot %s after the failed CreateSnapshot: %v; want it absent", name, err)
	}
}

// TestFrozenWindowBounded: the freeze is held for at most FreezeTimeout,
// however long what follows it takes (here the engine's cut, held at a
// gate): the filesystem is thawed while the cut still waits, and the
// snapshot then fails and is deleted. The freeze child holds no
// descriptor of the driver's FUSE connection or rings.
func TestFrozenWindowBounded(t *testing.T) {
	env, td, g := startGatedDriver(t, 2*time.Second)
	src := createVolume(t, td, &csi.CreateVolumeRequest{Name: "pvc-window"})
	pv := stageAndPublish(t, td, env, src.GetVolumeId(), mountCap(rwo, "ext4"))
	writeNoSync(t, filepath.Join(pv.target, "a.txt"), importantContent("window"))

	gateOf(g.snapshots).close()
	res := snapshotAsync(td, "snap-window", src.GetVolumeId())
	select {
	case <-gateOf(g.snapshots).waiting():
	case err := <-res:
		t.Fatalf("CreateSnapshot returned before the engine's cut: %v", err)
	}
	children := fsopChildren(t, "freeze")
	if len(children) != 1 {
		t.Fatalf("freeze children %v, want one", children)
	}
	checkChildDescriptors(t, children[0])

	waitFor(t, "the filesystem thawed while the cut waits", 10*time.Second, func() bool { return !isFrozen(t, pv.staging) })
	gateOf(g.snapshots).open()
	err := <-res
	if status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("CreateSnapshot with the cut after the window: %v; want DeadlineExceeded", err)
	}
	wantNoSnapshot(t, td, "snap-window")
	// Nothing left behind: the next snapshot works.
	snapshot(t, td, "snap-window-2", src.GetVolumeId(), nil)
}

// checkChildDescriptors fails if the child holds anything but its
// standard descriptors (and what the Go runtime opens for itself): above
// all not /dev/fuse or an io_uring of the driver's.
func checkChildDescriptors(t *testing.T, pid int) {
	t.Helper()
	dir := "/proc/" + strconv.Itoa(pid) + "/fd"
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		l, _ := os.Readlink(filepath.Join(dir, e.Name()))
		n, _ := strconv.Atoi(e.Name())
		switch {
		case strings.Contains(l, "/dev/fuse"), strings.Contains(l, "io_uring"):
			t.Errorf("freeze child %d holds fd %s -> %s", pid, e.Name(), l)
		case n <= 2, strings.HasPrefix(l, "anon_inode:[eventpoll]"), strings.HasPrefix(l, "anon_inode:[eventfd]"),
			strings.HasPrefix(l, "pipe:"), l == "/dev/null":
		default:
			// The child's own: the staging directory it froze, the
			// loop device it flushed.
			t.Logf("freeze child fd %s -> %s", e.Name(), l)
		}
	}
}

// TestLateFreeze: a freeze that completes after its window (here ext4's
// freeze waits for writes held at a gate) fails the snapshot, is thawed by
// its child as soon as it completes, and is known to the driver while it
// is pending: a retry is told so (Aborted) instead of reading EBUSY as
// "frozen by someone else" and reporting the snapshot consistent.
func TestLateFreeze(t *testing.T) {
	env, td, g := startGatedDriver(t, 2*time.Second)
	src := createVolume(t, td, &csi.CreateVolumeRequest{Name: "pvc-late"})
	pv := stageAndPublish(t, td, env, src.GetVolumeId(), mountCap(rwo, "ext4"))
	want := importantContent("late")
	writeNoSync(t, filepath.Join(pv.target, "late.txt"), want)

	gateOf(g.writes).close()
	err := <-snapshotAsync(td, "snap-late", src.GetVolumeId())
	if status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("CreateSnapshot with a late freeze: %v; want DeadlineExceeded", err)
	}
	wantNoSnapshot(t, td, "snap-late")
	select {
	case <-gateOf(g.writes).waiting():
	default:
		t.Fatal("the freeze never waited for the held writes")
	}
	err = <-snapshotAsync(td, "snap-late", src.GetVolumeId())
	if status.Code(err) != codes.Aborted {
		t.Fatalf("retry while our late freeze is pending: %v; want Aborted", err)
	}
	wantNoSnapshot(t, td, "snap-late")

	gateOf(g.writes).open()
	waitFor(t, "the late freeze's child gone", 20*time.Second, func() bool { return td.d.node.freezes.pendingFreezes() == 0 })
	if isFrozen(t, pv.staging) {
		t.Fatal("the late freeze left the filesystem frozen")
	}
	snap := snapshot(t, td, "snap-late", src.GetVolumeId(), nil)
	r := restore(t, td, env, "pvc-late-restored", snap)
	if got, err := os.ReadFile(filepath.Join(r.target, "late.txt")); err != nil || string(got) != string(want) {
		t.Errorf("late.txt in the retried snapshot: %d bytes (want %d), %v", len(got), len(want), err)
	}
}

// TestSnapshotStagingMountMissing: a volume staged here whose staging
// mount is gone must not freeze (or sync) whatever filesystem is at the
// staging path now, the node's own in real life, a tmpfs here: the
// snapshot fails with FailedPrecondition.
func TestSnapshotStagingMountMissing(t *testing.T) {
	env, td, _ := startGatedDriver(t, 5*time.Second)
	nodeFS := filepath.Join(env.root, "nodefs")
	if err := os.MkdirAll(nodeFS, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", nodeFS, "tmpfs", 0, "size=16m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(nodeFS, unix.MNT_DETACH) })
	src := createVolume(t, td, &csi.CreateVolumeRequest{Name: "pvc-unmounted"})
	staging := filepath.Join(nodeFS, "staging")
	if err := os.MkdirAll(staging, 0o750); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := td.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{
		VolumeId: src.GetVolumeId(), StagingTargetPath: staging, VolumeCapability: mountCap(rwo, "ext4"),
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		td.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: src.GetVolumeId(), StagingTargetPath: staging})
	})
	// Unmounted behind the driver's back.
	if err := unix.Unmount(staging, 0); err != nil {
		t.Fatal(err)
	}
	var before, after unix.Statfs_t
	unix.Statfs(nodeFS, &before)
	_, err := td.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap-unmounted", SourceVolumeId: src.GetVolumeId()})
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("CreateSnapshot with the staging mount missing: %v; want FailedPrecondition", err)
	}
	if !strings.Contains(err.Error(), "staging mount missing") {
		t.Errorf("error does not say what is wrong: %v", err)
	}
	unix.Statfs(nodeFS, &after)
	if before.Type != after.Type {
		t.Errorf("the filesystem at the staging path changed")
	}
	wantNoSnapshot(t, td, "snap-unmounted")
	waitFor(t, "no freeze under way", 10*time.Second, func() bool { return td.d.node.freezes.pendingFreezes() == 0 })
}

// TestFreezeChildKilled: a freeze child killed while it holds the freeze
// (an OOM kill, say) leaves the filesystem frozen; the driver thaws it
// from its record, and the snapshot fails.
func TestFreezeChildKilled(t *testing.T) {
	env, td, g := startGatedDriver(t, 20*time.Second)
	src := createVolume(t, td, &csi.CreateVolumeRequest{Name: "pvc-killed"})
	pv := stageAndPublish(t, td, env, src.GetVolumeId(), mountCap(rwo, "ext4"))

	gateOf(g.snapshots).close()
	res := snapshotAsync(td, "snap-killed", src.GetVolumeId())
	<-gateOf(g.snapshots).waiting()
	children := fsopChildren(t, "freeze")
	if len(children) != 1 {
		t.Fatalf("freeze children %v, want one", children)
	}
	if err := syscall.Kill(children[0], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the driver thawing after its child's death", 10*time.Second, func() bool {
		return td.d.node.freezes.pendingFreezes() == 0
	})
	if isFrozen(t, pv.staging) {
		t.Fatal("filesystem still frozen after the freeze child was killed")
	}
	gateOf(g.snapshots).open()
	if err := <-res; err == nil {
		t.Fatal("CreateSnapshot succeeded although its freeze child died before the thaw")
	}
	wantNoSnapshot(t, td, "snap-killed")
	recs, err := td.d.node.state.loadFreezes()
	if err != nil || len(recs) != 0 {
		t.Errorf("freeze records left: %v, %v", recs, err)
	}
}

// TestPanicWhileFrozenThaws: a panic between the freeze and the thaw (here
// in the engine's cut) still thaws at once, on the way out of the handler,
// long before the frozen window would end.
func TestPanicWhileFrozenThaws(t *testing.T) {
	env, td, g := startGatedDriver(t, time.Minute)
	src := createVolume(t, td, &csi.CreateVolumeRequest{Name: "pvc-panic"})
	pv := stageAndPublish(t, td, env, src.GetVolumeId(), mountCap(rwo, "ext4"))
	g.panicking.Store(true)
	t.Cleanup(func() { g.panicking.Store(false) })
	func() {
		defer func() {
			if r := recover(); r == nil {
				t.Fatal("CreateSnapshot did not panic")
			}
		}()
		// Straight to the service: no gRPC server, no recovery
		// interceptor, only the handler's own defers.
		td.d.controller.CreateSnapshot(context.Background(), &csi.CreateSnapshotRequest{Name: "snap-panic", SourceVolumeId: src.GetVolumeId()})
	}()
	if isFrozen(t, pv.staging) {
		t.Fatal("filesystem frozen after a panic in CreateSnapshot")
	}
}
