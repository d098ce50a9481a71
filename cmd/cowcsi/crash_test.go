package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
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
}

func startPlugin(t *testing.T, sock, store string) *plugin {
	t.Helper()
	cmd := exec.Command(os.Args[0], "--nodeid=n1", "--endpoint=unix://"+sock, "--store-dir="+store)
	cmd.Env = append(os.Environ(), "COWCSI_TEST_MAIN=1")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	p := &plugin{cmd: cmd, conn: conn, ctrl: csi.NewControllerClient(conn), node: csi.NewNodeClient(conn)}
	ident := csi.NewIdentityClient(conn)
	deadline := time.Now().Add(60 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		resp, err := ident.Probe(ctx, &csi.ProbeRequest{})
		cancel()
		if err == nil && resp.GetReady().GetValue() {
			return p
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("plugin not ready: %v", err)
		}
		time.Sleep(20 * time.Millisecond) // polling readiness
	}
}

func (p *plugin) kill() {
	p.conn.Close()
	p.cmd.Process.Signal(syscall.SIGKILL)
	p.cmd.Wait()
}

func (p *plugin) term(t *testing.T) {
	p.conn.Close()
	p.cmd.Process.Signal(syscall.SIGTERM)
	if err := p.cmd.Wait(); err != nil {
		t.Errorf("plugin exit after SIGTERM: %v", err)
	}
}

// TestCrashRecovery kills the plugin with SIGKILL while a volume is staged
// and published (its FUSE connection dies with it), starts it again on the
// same store, and checks that the volume is served again at the same paths
// with the data that was fsynced before the kill.
func TestCrashRecovery(t *testing.T) {
	testutil.RequireRoot(t, "mkfs.ext4", "mount", "blkid")
	root := t.TempDir()
	t.Cleanup(func() { cleanupUnder(t, root) })
	sockDir := testutil.SocketDir(t)
	sock, store := filepath.Join(sockDir, "csi.sock"), filepath.Join(root, "store")
	staging, target := filepath.Join(root, "staging"), filepath.Join(root, "pod", "mount")
	os.MkdirAll(staging, 0o750)
	ctx := context.Background()
	vc := &csi.VolumeCapability{
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: "ext4"}},
	}

	p1 := startPlugin(t, sock, store)
	vol, err := p1.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "crash", VolumeCapabilities: []*csi.VolumeCapability{vc},
		CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20}})
	if err != nil {
		p1.kill()
		t.Fatal(err)
	}
	id := vol.GetVolume().GetVolumeId()
	if _, err := p1.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: vc}); err != nil {
		p1.kill()
		t.Fatal(err)
	}
	if _, err := p1.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging, TargetPath: target, VolumeCapability: vc}); err != nil {
		p1.kill()
		t.Fatal(err)
	}
	want := bytes.Repeat([]byte("synced before the crash\n"), 10000)
	f, err := os.Create(filepath.Join(target, "data"))
	if err == nil {
		_, err = f.Write(want)
		if err == nil {
			err = f.Sync()
		}
		f.Close()
	}
	if err != nil {
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
	if _, err := p2.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Errorf("NodeUnpublishVolume: %v", err)
	}
	if _, err := p2.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Errorf("NodeUnstageVolume: %v", err)
	}
	if _, err := p2.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id}); err != nil {
		t.Errorf("DeleteVolume: %v", err)
	}
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
