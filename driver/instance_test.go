package driver

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/cowcsi/cowcsi/test/testutil"
)

// TestListenRefusesLiveSocket: a socket that accepts connections belongs to
// another process and is left alone; one that refuses them is stale and is
// replaced.
func TestListenRefusesLiveSocket(t *testing.T) {
	dir := testutil.SocketDir(t)
	path := filepath.Join(dir, "csi.sock")
	d := &Driver{opts: Options{Endpoint: "unix://" + path}}

	live, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	if lis, _, err := d.listen(); !errors.Is(err, errAnotherInstance) {
		if lis != nil {
			lis.Close()
		}
		t.Fatalf("listen over a live socket: %v, want %v", err, errAnotherInstance)
	}
	// The live listener still gets its clients.
	accepted := make(chan error, 1)
	go func() {
		c, err := live.Accept()
		if err == nil {
			c.Close()
		}
		accepted <- err
	}()
	c, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		t.Fatalf("the live socket no longer accepts connections: %v", err)
	}
	c.Close()
	if err := <-accepted; err != nil {
		t.Fatal(err)
	}

	// The same socket file, its listener gone: stale, replaced.
	live.(*net.UnixListener).SetUnlinkOnClose(false)
	live.Close()
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("stale socket file missing: %v", err)
	}
	lis, got, err := d.listen()
	if err != nil {
		t.Fatalf("listen over a stale socket: %v", err)
	}
	defer lis.Close()
	if got != path {
		t.Errorf("listen path %s, want %s", got, path)
	}
	go func() {
		if c, err := lis.Accept(); err == nil {
			c.Close()
		}
	}()
	if c, err := net.DialTimeout("unix", path, time.Second); err != nil {
		t.Errorf("new socket does not accept connections: %v", err)
	} else {
		c.Close()
	}

	// Not a socket: refused, and kept.
	file := filepath.Join(dir, "file")
	os.WriteFile(file, []byte("x"), 0o600)
	d2 := &Driver{opts: Options{Endpoint: "unix://" + file}}
	if _, _, err := d2.listen(); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("listen over a regular file: %v", err)
	}
	if _, err := os.Stat(file); err != nil {
		t.Errorf("regular file removed: %v", err)
	}
}

// TestLockInstance: one holder per store directory; the refusal names it.
func TestLockInstance(t *testing.T) {
	dir := t.TempDir()
	f, err := lockInstance(dir)
	if err != nil {
		t.Fatal(err)
	}
	_, err = lockInstance(dir)
	if !errors.Is(err, errAnotherInstance) || !strings.Contains(err.Error(), "pid "+strconv.Itoa(os.Getpid())) {
		t.Errorf("second lock: %v, want %v naming pid %d", err, errAnotherInstance, os.Getpid())
	}
	f.Close()
	f, err = lockInstance(dir)
	if err != nil {
		t.Fatalf("lock after release: %v", err)
	}
	f.Close()
}

// TestShutdownKeepsUnloadedState: a node service whose start did not run
// (or failed) must not write the node state it never loaded.
func TestShutdownKeepsUnloadedState(t *testing.T) {
	d := &Driver{opts: Options{StoreDir: t.TempDir()}}
	n := newNodeService(d)
	id := volumeIDFor("kept")
	if err := n.state.save(map[string]*stagedVolume{id: {VolumeID: id, StagingPath: "/s", AccessType: accessBlock}}); err != nil {
		t.Fatal(err)
	}
	if err := errors.Join(n.syncAll(context.Background()), n.saveState()); err != nil {
		t.Fatal(err)
	}
	vols, err := n.state.load()
	if err != nil || vols[id] == nil {
		t.Errorf("node state after shutdown of an unstarted node service: %v %v, want %s kept", vols, err, id)
	}
}

// TestSecondInstance starts a second driver on the store and socket of a
// running one that has a volume staged and published. The second must fail
// with errAnotherInstance and leave the first fully working: its socket
// answers, its node state still lists the volume, and the volume is still
// staged and takes writes. A second driver on another store but the same
// socket is refused too.
func TestSecondInstance(t *testing.T) {
	testutil.RequireRoot(t, nodeNeeds...)
	env := newTestEnv(t)
	td := startDriver(t, env)
	vol := createVolume(t, td, &csi.CreateVolumeRequest{Name: "second-instance"})
	pv := stageAndPublish(t, td, env, vol.GetVolumeId(), mountCap(rwo, "ext4"))

	sameStore := testOptions(env)
	otherStore := testOptions(env)
	otherStore.StoreDir = filepath.Join(env.root, "other-store")
	for _, opts := range []Options{sameStore, otherStore} {
		d2, err := New(opts, DefaultDeps())
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		err = d2.Run(ctx)
		cancel()
		if !errors.Is(err, errAnotherInstance) {
			t.Errorf("second instance on store %s: %v, want %v", opts.StoreDir, err, errAnotherInstance)
		} else {
			t.Logf("second instance refused: %v", err)
		}
		checkFirstInstance(t, env, td, pv)
	}
}

// checkFirstInstance checks that the driver td still serves env on a new
// connection (as a new sidecar or kubelet would connect) and that pv is
// still staged, published and recorded in the node state.
func checkFirstInstance(t *testing.T, env *testEnv, td *testDriver, pv publishedVolume) {
	t.Helper()
	conn, err := grpc.NewClient(env.endpoint(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if resp, err := csi.NewIdentityClient(conn).Probe(ctx, &csi.ProbeRequest{}); err != nil || !resp.GetReady().GetValue() {
		t.Errorf("first instance Probe on a new connection: ready=%v, %v", resp.GetReady().GetValue(), err)
	}
	node := csi.NewNodeClient(conn)
	if resp, err := node.NodeGetInfo(ctx, &csi.NodeGetInfoRequest{}); err != nil || resp.GetNodeId() != env.nodeID {
		t.Errorf("first instance NodeGetInfo on a new connection: %q, %v", resp.GetNodeId(), err)
	}
	if _, err := node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: pv.id, VolumePath: pv.target}); err != nil {
		t.Errorf("NodeGetVolumeStats of the staged volume on a new connection: %v", err)
	}
	vols, err := stateFile{dir: td.d.opts.stateDir()}.load()
	if err != nil || vols[pv.id] == nil {
		t.Errorf("node state lists %d volumes (err %v), want %s", len(vols), err, pv.id)
	}
	if !td.d.node.isStaged(pv.id) {
		t.Errorf("volume %s no longer staged in the first instance", pv.id)
	}
	writeSynced(t, filepath.Join(pv.target, "still-works.txt"), []byte("first instance"), 0)
}
