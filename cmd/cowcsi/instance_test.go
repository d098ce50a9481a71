package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/cowcsi/cowcsi/cow/loopdev"
)

// TestSecondInstance is the operator's reproduction: with a volume staged
// and published, the same command is started again. It must exit 1 with a
// clear error and leave the first instance serving; after the first is
// killed, the next instance must still recover the staged volume (the
// second did not wipe the node state).
func TestSecondInstance(t *testing.T) {
	m := startWithMountedVolume(t, "second")
	p1, root, sock, store, target, id := m.p1, m.root, m.sock, m.store, m.target, m.id
	ctx := context.Background()
	fail := func(err error) {
		p1.kill()
		t.Fatal(err)
	}
	// Should the volume be forgotten (the bug), its loop device would
	// outlive the test under the short name of a dead FUSE file.
	staged, _ := loopdev.BindingsUnder(root)
	t.Cleanup(func() { clearLoopsOf(t, staged) })

	// The same command again.
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	second := exec.CommandContext(cctx, os.Args[0], "--nodeid=n1", "--endpoint=unix://"+sock, "--store-dir="+store)
	second.Env = append(os.Environ(), "COWCSI_TEST_MAIN=1")
	out, err := second.CombinedOutput()
	cancel()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 || !strings.Contains(string(out), "another cowcsi instance is running") {
		t.Errorf("second instance: %v, want exit status 1 naming the other instance; output:\n%s", err, out)
	}

	// The first still serves new clients and its volume.
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fail(err)
	}
	pctx, pcancel := context.WithTimeout(ctx, 5*time.Second)
	resp, err := csi.NewIdentityClient(conn).Probe(pctx, &csi.ProbeRequest{})
	pcancel()
	conn.Close()
	if err != nil || !resp.GetReady().GetValue() {
		t.Errorf("first instance after the second: Probe ready=%v, %v", resp.GetReady().GetValue(), err)
	}
	want := bytes.Repeat([]byte("written after the second instance\n"), 1000)
	if err := writeFileSynced(filepath.Join(target, "data"), want); err != nil {
		fail(err)
	}

	// Killed, the first leaves its node state to the next instance,
	// which serves the volume again at the same paths.
	p1.kill()
	p3 := startPlugin(t, sock, store)
	t.Cleanup(func() {
		left, _ := loopdev.BindingsUnder(root)
		p3.term(t)
		clearLoopsOf(t, left)
	})
	if _, err := p3.node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target}); err != nil {
		t.Errorf("after kill and restart, the volume is not staged: NodeGetVolumeStats: %v", err)
	}
	if got, err := os.ReadFile(filepath.Join(target, "data")); err != nil || !bytes.Equal(got, want) {
		t.Errorf("after kill and restart: %d bytes (want %d), err %v", len(got), len(want), err)
	}
	m.remove(t, p3)
}

// clearLoopsOf detaches the devices of left (from BindingsUnder) that are
// still bound to the same file, by its full path or, once its FUSE
// mount is gone, by the short name the kernel keeps.
func clearLoopsOf(t *testing.T, left []loopdev.Binding) {
	for _, b := range left {
		if c, err := loopdev.BackingFileOf(b.Path); err == nil && (c == b.BackingFile || c == "/"+filepath.Base(b.BackingFile)) {
			clearLoop(t, b.Path)
		}
	}
}

func writeFileSynced(path string, data []byte) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
