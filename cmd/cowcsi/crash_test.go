package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/cowcsi/cowcsi/cow/loopdev"
	"github.com/cowcsi/cowcsi/test/testutil"
)

// plugin is the cowcsi binary (this test binary re-executed) and a client.
type plugin struct {
	cmd  *exec.Cmd
	conn *grpc.ClientConn
	ctrl csi.ControllerClient
	node csi.NodeClient
	// exited is closed once the process has been waited for; waitErr is
	// then its exit status.
	exited  chan struct{}
	waitErr error
}

func startPlugin(t *testing.T, sock, store string) *plugin {
	t.Helper()
	p, err := launchPlugin(os.Args[0], sock, store, os.Stderr)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// launchPlugin starts the plugin binary bin (this test binary or a built
// cowcsi) with extra flags, its log to stderr, and waits until Probe says
// ready. It fails at once if the process exits first, else after a
// minute; the process is killed then.
func launchPlugin(bin, sock, store string, stderr io.Writer, extra ...string) (*plugin, error) {
	return launchPluginWithin(time.Minute, bin, sock, store, stderr, extra...)
}

// launchPluginWithin is launchPlugin with its own bound on readiness.
func launchPluginWithin(ready time.Duration, bin, sock, store string, stderr io.Writer, extra ...string) (*plugin, error) {
	args := append([]string{"--nodeid=n1", "--endpoint=unix://" + sock, "--store-dir=" + store}, extra...)
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "COWCSI_TEST_MAIN=1")
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &plugin{cmd: cmd, exited: make(chan struct{})}
	manage(cmd.Process.Pid)
	go func() {
		p.waitErr = cmd.Wait()
		unmanage(cmd.Process.Pid)
		close(p.exited)
	}()
	// Until the socket exists connecting fails; the default reconnect
	// backoff would then hold the first Probe for a second.
	fast := grpc.ConnectParams{Backoff: backoff.Config{BaseDelay: 20 * time.Millisecond, Multiplier: 1.5, MaxDelay: 500 * time.Millisecond},
		MinConnectTimeout: 5 * time.Second}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithConnectParams(fast))
	if err != nil {
		p.kill()
		return nil, err
	}
	p.conn, p.ctrl, p.node = conn, csi.NewControllerClient(conn), csi.NewNodeClient(conn)
	ident := csi.NewIdentityClient(conn)
	deadline := time.Now().Add(ready)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		resp, err := ident.Probe(ctx, &csi.ProbeRequest{})
		cancel()
		if err == nil && resp.GetReady().GetValue() {
			return p, nil
		}
		select {
		case <-p.exited:
			p.conn.Close()
			return nil, fmt.Errorf("plugin exited before it was ready: %v (last Probe: %v)", p.waitErr, err)
		default:
		}
		if time.Now().After(deadline) {
			p.kill()
			return nil, fmt.Errorf("plugin not ready: %v", err)
		}
		time.Sleep(20 * time.Millisecond) // polling readiness
	}
}

func (p *plugin) pid() int { return p.cmd.Process.Pid }

func (p *plugin) kill() {
	p.conn.Close()
	p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.exited
}

func (p *plugin) term(t *testing.T) {
	p.conn.Close()
	p.cmd.Process.Signal(syscall.SIGTERM)
	<-p.exited
	if p.waitErr != nil {
		t.Errorf("plugin exit after SIGTERM: %v", p.waitErr)
	}
}

// waitExit waits up to bound for the process to end.
func (p *plugin) waitExit(bound time.Duration) bool { return waitClosed(p.exited, bound) }

// mountedVolume is a plugin started on a fresh store with one 64 MiB ext4
// volume created, staged and published: the start of the restart tests.
type mountedVolume struct {
	p1                                 *plugin
	root, sock, store, staging, target string
	id                                 string
}

// startWithMountedVolume starts the plugin and mounts volume name; paths
// and loop devices under the test's directory are cleaned up on every path.
func startWithMountedVolume(t *testing.T, name string) mountedVolume {
	testutil.RequireRoot(t, "mkfs.ext4", "mount", "blkid")
	root := t.TempDir()
	t.Cleanup(func() { cleanupUnder(t, root) })
	m := mountedVolume{root: root, sock: filepath.Join(testutil.SocketDir(t), "csi.sock"), store: filepath.Join(root, "store"),
		staging: filepath.Join(root, "staging"), target: filepath.Join(root, "pod", "mount")}
	os.MkdirAll(m.staging, 0o750)
	ctx := context.Background()
	vc := &csi.VolumeCapability{
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: "ext4"}},
	}
	m.p1 = startPlugin(t, m.sock, m.store)
	fail := func(err error) {
		m.p1.kill()
		t.Fatal(err)
	}
	vol, err := m.p1.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, VolumeCapabilities: []*csi.VolumeCapability{vc},
		CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20}})
	if err != nil {
		fail(err)
	}
	m.id = vol.GetVolume().GetVolumeId()
	if _, err := m.p1.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: m.id, StagingTargetPath: m.staging, VolumeCapability: vc}); err != nil {
		fail(err)
	}
	if _, err := m.p1.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: m.id, StagingTargetPath: m.staging, TargetPath: m.target, VolumeCapability: vc}); err != nil {
		fail(err)
	}
	return m
}

// remove unpublishes, unstages and deletes the volume through p, the
// plugin serving it at the end of a test.
func (m mountedVolume) remove(t *testing.T, p *plugin) {
	ctx := context.Background()
	if _, err := p.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: m.id, TargetPath: m.target}); err != nil {
		t.Errorf("NodeUnpublishVolume: %v", err)
	}
	if _, err := p.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: m.id, StagingTargetPath: m.staging}); err != nil {
		t.Errorf("NodeUnstageVolume: %v", err)
	}
	if _, err := p.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: m.id}); err != nil {
		t.Errorf("DeleteVolume: %v", err)
	}
}

// TestCrashRecovery kills the plugin with SIGKILL while a volume is staged
// and published (its FUSE connection dies with it), starts it again on the
// same store, and checks that the volume is served again at the same paths
// with the data that was fsynced before the kill.
func TestCrashRecovery(t *testing.T) {
	m := startWithMountedVolume(t, "crash")
	p1, root, sock, store, target := m.p1, m.root, m.sock, m.store, m.target
	want := bytes.Repeat([]byte("synced before the crash\n"), 10000)
	if err := writeFileSynced(filepath.Join(target, "data"), want); err != nil {
		p1.kill()
		t.Fatal(err)
	}
	p1.kill()

	p2 := startPlugin(t, sock, store)
	t.Cleanup(func() {
		// Loops still on the plugin's FUSE files (a failed run) would
		// outlive the FUSE mount under a short name: note them first.
		left, _ := loopdev.BindingsUnder(root)
		p2.term(t)
		clearLoopsOf(t, left)
	})
	got, err := os.ReadFile(filepath.Join(target, "data"))
	if err != nil || !bytes.Equal(got, want) {
		t.Errorf("after crash and restart: %d bytes (want %d), err %v", len(got), len(want), err)
	}
	m.remove(t, p2)
}

// cleanupUnder detaches loop devices backed below root and every mount
// below root: what a failed run may leave.
func cleanupUnder(t *testing.T, root string) {
	bound, _ := loopdev.BindingsUnder(root)
	for _, b := range bound {
		clearLoop(t, b.Path)
	}
	testutil.UnmountAll(t, root)
}

func clearLoop(t *testing.T, dev string) {
	if loopdev.ClearFD(dev) == nil {
		t.Logf("cleanup: detached %s", dev)
	}
}
