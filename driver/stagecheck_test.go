package driver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cowcsi/cowcsi/test/testutil"
)

// faults is a script of failures for the node's loop devices, FUSE export
// and mounter: the call named by the first step fails with its error and
// the step is dropped; every other call goes through. So a failure of a
// cleanup fires only after the failure that started the cleanup.
type faults struct {
	mu    sync.Mutex
	steps []faultStep
}

type faultStep struct {
	op  string // "attach", "detach", "remove" or "mount"
	err error
}

var errInjected = errors.New("injected failure")

func (f *faults) next(op string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.steps) == 0 || f.steps[0].op != op {
		return nil
	}
	err := f.steps[0].err
	f.steps = f.steps[1:]
	return err
}

// script replaces the remaining steps; n copies of each.
func (f *faults) script(n int, steps ...faultStep) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.steps = nil
	for _, s := range steps {
		for range n {
			f.steps = append(f.steps, s)
		}
	}
}

type faultyLoop struct {
	LoopDevices
	f *faults
}

func (l faultyLoop) Attach(ctx context.Context, backing string, readOnly bool) (string, error) {
	if err := l.f.next("attach"); err != nil {
		return "", err
	}
	return l.LoopDevices.Attach(ctx, backing, readOnly)
}

func (l faultyLoop) Detach(ctx context.Context, dev, backing string) error {
	if err := l.f.next("detach"); err != nil {
		return err
	}
	return l.LoopDevices.Detach(ctx, dev, backing)
}

type faultyExport struct {
	FileExport
	f *faults
}

func (e faultyExport) Remove(name string) error {
	if err := e.f.next("remove"); err != nil {
		return err
	}
	return e.FileExport.Remove(name)
}

type faultyMounter struct {
	Mounter
	f *faults
}

func (m faultyMounter) FormatAndMount(source, target, fstype string, options []string) error {
	if err := m.f.next("mount"); err != nil {
		return err
	}
	return m.Mounter.FormatAndMount(source, target, fstype, options)
}

// startFaultyDriver starts a node driver whose loop devices, export and
// mounter fail as f says.
func startFaultyDriver(t *testing.T) (*testEnv, *testDriver, *faults) {
	t.Helper()
	testutil.RequireRoot(t, nodeNeeds...)
	env := newTestEnv(t)
	f := &faults{}
	deps := DefaultDeps()
	deps.Loop = faultyLoop{deps.Loop, f}
	deps.Mounter = faultyMounter{deps.Mounter, f}
	mountExport := deps.MountExport
	deps.MountExport = func(ctx context.Context, dir, ioURing string) (FileExport, error) {
		e, err := mountExport(ctx, dir, ioURing)
		if err != nil {
			return nil, err
		}
		return faultyExport{e, f}, nil
	}
	return env, startDriverWith(t, testOptions(env), deps), f
}

// TestStageAfterFailedCleanup makes a stage fail and its cleanup fail too,
// then stages the volume again: what the failed cleanup left (a name in
// the export, a bound loop device) must not fail every later stage.
func TestStageAfterFailedCleanup(t *testing.T) {
	env, td, f := startFaultyDriver(t)
	cases := []struct {
		name   string
		vc     *csi.VolumeCapability
		inject func()
	}{
		{"loop attach fails, then the file's removal", blockCap(rwo), func() {
			f.script(1, faultStep{"attach", errInjected}, faultStep{"remove", errInjected})
		}},
		{"mount fails, then the loop detach and the file's removal", mountCap(rwo, "ext4"), func() {
			f.script(1, faultStep{"mount", errInjected}, faultStep{"detach", errInjected}, faultStep{"remove", errInjected})
		}},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			id := createVolume(t, td, &csi.CreateVolumeRequest{Name: fmt.Sprintf("failed-cleanup-%d", i),
				VolumeCapabilities: []*csi.VolumeCapability{tc.vc}}).GetVolumeId()
			staging := filepath.Join(env.root, "staging", id)
			tc.inject()
			defer f.script(0)
			_, err := td.node.NodeStageVolume(context.Background(), &csi.NodeStageVolumeRequest{
				VolumeId: id, StagingTargetPath: staging, VolumeCapability: tc.vc})
			if err == nil {
				t.Fatalf("NodeStageVolume with injected failures succeeded")
			}
			t.Logf("first NodeStageVolume: %v", err)
			pv := stageAndPublish(t, td, env, id, tc.vc)
			checkVolumeIO(t, pv, tc.vc)
		})
	}
}

// TestRestageAfterHalfFailedUnstage fails a block volume's unstage half-way,
// then stages it again: the stage must repair the attachment, so that the
// data written before is there and I/O works.
func TestRestageAfterHalfFailedUnstage(t *testing.T) {
	env, td, f := startFaultyDriver(t)
	vc := blockCap(rwo)
	cases := []struct {
		name   string
		inject func()
	}{
		// The file stays busy for longer than NodeUnstageVolume waits.
		{"file busy after the loop detach", func() { f.script(1000, faultStep{"remove", fmt.Errorf("%w: injected", errExportBusy)}) }},
		{"loop detach fails", func() { f.script(1, faultStep{"detach", errInjected}) }},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			id := createVolume(t, td, &csi.CreateVolumeRequest{Name: fmt.Sprintf("half-unstaged-%d", i),
				VolumeCapabilities: []*csi.VolumeCapability{vc}}).GetVolumeId()
			pv := stageAndPublishNoCleanup(t, td, env, id, vc)
			want := bytes.Repeat([]byte(tc.name[:4]), 64<<10/4)
			writeDirect(t, pv.target, 0, want)
			ctx := context.Background()
			if _, err := td.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: pv.target}); err != nil {
				t.Fatalf("NodeUnpublishVolume: %v", err)
			}
			tc.inject()
			_, err := td.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: pv.staging})
			if status.Code(err) != codes.FailedPrecondition {
				t.Fatalf("NodeUnstageVolume with an injected failure: %v, want FailedPrecondition", err)
			}
			f.script(0)
			pv = stageAndPublish(t, td, env, id, vc)
			if got := readDirect(t, pv.target, int64(len(want))); !bytes.Equal(got, want) {
				t.Fatalf("data written before the failed unstage is not read back after the restage")
			}
			checkVolumeIO(t, pv, vc)
		})
	}
}

// checkVolumeIO writes and reads back a block through the published volume.
func checkVolumeIO(t *testing.T, pv publishedVolume, vc *csi.VolumeCapability) {
	t.Helper()
	p := bytes.Repeat([]byte("io works "), 1000)
	if vc.GetBlock() != nil {
		p = p[:8192]
		writeDirect(t, pv.target, 1<<20, p)
		if got := readDirect(t, pv.target, 1<<20+8192)[1<<20:]; !bytes.Equal(got, p) {
			t.Fatalf("block volume: read back differs from what was written")
		}
		return
	}
	file := filepath.Join(pv.target, "f")
	if err := os.WriteFile(file, p, 0o600); err != nil {
		t.Fatalf("write to the filesystem volume: %v", err)
	}
	if got, err := os.ReadFile(file); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("read back from the filesystem volume: %v (equal=%v)", err, bytes.Equal(got, p))
	}
}

// writeDirect writes p at off to a block device with O_DIRECT and fsyncs.
func writeDirect(t *testing.T, path string, off int64, p []byte) {
	t.Helper()
	fd, err := unix.Open(path, unix.O_WRONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatalf("open %s: %v", path, err)
	}
	defer unix.Close(fd)
	buf, err := unix.Mmap(-1, 0, len(p), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(buf)
	copy(buf, p)
	if _, err := unix.Pwrite(fd, buf, off); err != nil {
		t.Fatalf("write %s: %v", path, err)
	}
	if err := unix.Fsync(fd); err != nil {
		t.Fatalf("fsync %s: %v", path, err)
	}
}
