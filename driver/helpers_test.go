package driver

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/cowcsi/cowcsi/cow/fusefs"
	"github.com/cowcsi/cowcsi/cow/loopdev"
	"github.com/cowcsi/cowcsi/test/testutil"
)

// nodeNeeds is what the driver tests need besides root (testutil.RequireRoot):
// FUSE, loop devices, and the tools that format, mount and grow filesystems.
var nodeNeeds = []string{testutil.DevFUSE, testutil.DevLoopControl, "mkfs.ext4", "blkid", "mount", "resize2fs"}

// testEnv is one node's directories, all under a fresh temporary
// directory: store, staging and target paths, and the socket.
type testEnv struct {
	root     string // everything the test creates lives below
	storeDir string
	sockDir  string
	nodeID   string
}

func newTestEnv(t testing.TB) *testEnv {
	t.Helper()
	root := t.TempDir()
	sockDir := testutil.SocketDir(t)
	env := &testEnv{root: root, storeDir: filepath.Join(root, "store"), sockDir: sockDir, nodeID: "node-" + randHex(4)}
	// Registered before any driver starts, so it runs after every
	// driver's own cleanup (t.Cleanup is LIFO): the last line of defence
	// against leaking mounts and loop devices into the machine.
	t.Cleanup(func() { cleanupKernel(t, root) })
	return env
}

func (e *testEnv) endpoint() string { return "unix://" + filepath.Join(e.sockDir, "csi.sock") }

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// testDriver is a running Driver and a client connection to it.
type testDriver struct {
	d      *Driver
	conn   *grpc.ClientConn
	cancel context.CancelFunc
	done   chan error
	ctrl   csi.ControllerClient
	node   csi.NodeClient
	ident  csi.IdentityClient
}

func testOptions(env *testEnv) Options {
	o := DefaultOptions()
	o.Endpoint = env.endpoint()
	o.NodeID = env.nodeID
	o.StoreDir = env.storeDir
	o.DefaultVolumeSize = 64 << 20
	o.StopTimeout = 10 * time.Second
	// Where the kernel has FUSE over io_uring, the tests require it, so
	// that a silent fallback to /dev/fuse shows as a failure.
	if fusefs.IOURingSupported() {
		o.FuseIOURing = FuseIOURingOn
	}
	return o
}

// startNodeDriver skips the test unless it can run the node side (root,
// tools), and starts a driver on a new test environment.
func startNodeDriver(t *testing.T) (*testEnv, *testDriver) {
	t.Helper()
	testutil.RequireRoot(t, nodeNeeds...)
	env := newTestEnv(t)
	return env, startDriver(t, env)
}

// startDriver runs a driver on env and waits until Probe says ready. It is
// stopped in t.Cleanup unless the test stops it first.
func startDriver(t testing.TB, env *testEnv) *testDriver {
	t.Helper()
	return startDriverWith(t, testOptions(env), DefaultDeps())
}

func startDriverWith(t testing.TB, opts Options, deps Deps) *testDriver {
	t.Helper()
	d, err := New(opts, deps)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	td := &testDriver{d: d, cancel: cancel, done: make(chan error, 1)}
	go func() { td.done <- d.Run(ctx) }()
	conn, err := grpc.NewClient(opts.Endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	td.conn = conn
	td.ctrl, td.node, td.ident = csi.NewControllerClient(conn), csi.NewNodeClient(conn), csi.NewIdentityClient(conn)
	t.Cleanup(func() {
		// Loops still bound to this driver's FUSE files when the test
		// ends (a failed test that did not unstage) would outlive the
		// FUSE mount under another name; note them while the names are
		// still full paths, and detach what is left after the stop.
		fuse := opts.fuseDir()
		left, _ := loopdev.BindingsUnder(fuse)
		td.stop(t)
		for _, b := range left {
			if cur, err := loopdev.BackingFileOf(b.Path); err == nil && sameBacking(cur, b.BackingFile) {
				detachLoop(t, b.Path)
			}
		}
	})
	deadline := time.Now().Add(60 * time.Second)
	for {
		select {
		case err := <-td.done:
			td.done <- err
			t.Fatalf("driver exited while starting: %v", err)
		default:
		}
		pctx, pcancel := context.WithTimeout(context.Background(), time.Second)
		resp, err := td.ident.Probe(pctx, &csi.ProbeRequest{})
		pcancel()
		if err == nil && resp.GetReady().GetValue() {
			return td
		}
		if time.Now().After(deadline) {
			t.Fatalf("driver not ready after 60s: %v", err)
		}
		time.Sleep(20 * time.Millisecond) // polling readiness
	}
}

// stop stops the driver gracefully (as SIGTERM would) and waits for Run.
func (td *testDriver) stop(t testing.TB) {
	t.Helper()
	if td.cancel == nil {
		return
	}
	td.cancel()
	td.cancel = nil
	td.conn.Close()
	select {
	case err := <-td.done:
		if err != nil {
			t.Errorf("driver stopped with error: %v", err)
		}
	case <-time.After(2 * time.Minute):
		t.Errorf("driver did not stop within 2 minutes")
	}
}

// cleanupKernel detaches every mount below root (deepest first) and every
// loop device whose backing file is below root. Tests are expected to
// unstage what they stage; this catches what a failed test left.
func cleanupKernel(t testing.TB, root string) {
	testutil.UnmountAll(t, root)
	bound, _ := loopdev.BindingsUnder(root)
	for _, b := range bound {
		detachLoop(t, b.Path)
	}
}

func detachLoop(t testing.TB, dev string) {
	if err := loopdev.ClearFD(dev); err == nil {
		t.Logf("cleanup: detached leftover %s", dev)
	}
}

func mountCap(mode csi.VolumeCapability_AccessMode_Mode, fsType string) *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode},
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fsType}},
	}
}

func blockCap(mode csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode},
		AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
	}
}

var rwo = csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER

// hasCapSysResource reports whether this process may grow a mounted ext4
// filesystem (EXT4_IOC_RESIZE_FS checks CAP_SYS_RESOURCE).
func hasCapSysResource() bool {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			var caps uint64
			if _, err := fmt.Sscanf(strings.TrimSpace(v), "%x", &caps); err != nil {
				return false
			}
			return caps&(1<<unix.CAP_SYS_RESOURCE) != 0
		}
	}
	return false
}
