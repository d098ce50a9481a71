package fusefs

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/cowcsi/cowcsi/cow/loopdev"
	"golang.org/x/sys/unix"
)

// loopOnMemFile serves a memFile of size bytes as "vol" on s and attaches
// a loop device to it.
func loopOnMemFile(t *testing.T, s *Server, size int) (*memFile, *loopdev.Device) {
	t.Helper()
	m := newMemFile(size)
	add(t, s, "vol", m, false)
	return m, attachLoop(t, s.Path("vol"), false)
}

// attachLoop attaches a loop device to path with cowcsi's settings and
// detaches it on every path out of the test.
func attachLoop(t *testing.T, path string, readOnly bool) *loopdev.Device {
	t.Helper()
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		t.Skipf("needs loop devices: %v", err)
	}
	d, err := loopdev.Attach(context.Background(), path, loopdev.Options{
		ReadOnly: readOnly, DirectIO: true, LogicalBlockSize: 4096,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := d.Detach(); err != nil {
			t.Errorf("cleanup Detach %s: %v", d.Path, err)
		}
	})
	return d
}

// run runs a command, failing the test with its output on error.
func run(t *testing.T, ctx context.Context, name string, args ...string) {
	t.Helper()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}

// mountFS mounts dev at a test directory and unmounts it on every path out
// of the test; umount returns an unmount function for the happy path.
func mountFS(t *testing.T, ctx context.Context, dev string, opts ...string) (dir string, umount func()) {
	t.Helper()
	dir = t.TempDir()
	args := append(opts, dev, dir)
	run(t, ctx, "mount", args...)
	mounted := true
	umount = func() {
		if mounted {
			mounted = false
			run(t, ctx, "umount", dir)
		}
	}
	t.Cleanup(func() {
		if mounted {
			mounted = false
			if err := unix.Unmount(dir, 0); err != nil {
				t.Errorf("cleanup umount %s: %v", dir, err)
			}
		}
	})
	return dir, umount
}

// TestExt4OnLoop is the production stack: ext4 on a 4096-byte-sector loop
// device with direct I/O, on a FUSE file, on a BlockFile.
func TestExt4OnLoop(t *testing.T) { eachTransport(t, testExt4OnLoop) }

func testExt4OnLoop(t *testing.T, o Options) {
	s := mount(t, o)
	for _, tool := range []string{"mkfs.ext4", "mount", "umount"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s (apt-get install e2fsprogs mount): %v", tool, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	m, dev := loopOnMemFile(t, s, 64<<20)
	if !dev.DirectIO() {
		t.Errorf("loop device on the FUSE file fell back to buffered I/O")
	}
	if bs, err := dev.LogicalBlockSize(); err != nil || bs != 4096 {
		t.Fatalf("logical block size %d, %v; want 4096", bs, err)
	}

	// mkfs discards the whole device first: that exercises FALLOCATE.
	run(t, ctx, "mkfs.ext4", "-q", "-F", dev.Path)
	if _, discards := m.counts(); discards == 0 {
		t.Error("mkfs.ext4's discard did not reach the BlockFile")
	}
	dir, umount := mountFS(t, ctx, dev.Path)
	data := pattern(3<<20+123, 9)
	if err := os.WriteFile(filepath.Join(dir, "hello"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	flushesBefore, _ := m.counts()
	// syncfs → journal commit → flush of the loop device → FSYNC.
	run(t, ctx, "sync", "-f", filepath.Join(dir, "hello"))
	if flushes, _ := m.counts(); flushes == flushesBefore {
		t.Error("sync of the filesystem did not reach Flush")
	}
	umount()
	if err := dev.Detach(); err != nil {
		t.Fatal(err)
	}
	// With the loop device gone, nothing holds the file.
	if err := s.Remove("vol"); err != nil {
		t.Fatalf("Remove after detach: %v", err)
	}

	// Serve the same bytes again, read-only, and read the file back.
	add(t, s, "vol-ro", m, true)
	ro := attachLoop(t, s.Path("vol-ro"), true)
	run(t, ctx, "fsck.ext4", "-n", "-f", ro.Path)
	dir, _ = mountFS(t, ctx, ro.Path, "-o", "ro,noload")
	got, err := os.ReadFile(filepath.Join(dir, "hello"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("file read back differs (%d bytes, want %d)", len(got), len(data))
	}
}

// TestLoopResize grows the BlockFile under an attached loop device, as
// NodeExpandVolume does.
func TestLoopResize(t *testing.T) { eachTransport(t, testLoopResize) }

func testLoopResize(t *testing.T, o Options) {
	s := mount(t, o)
	m, dev := loopOnMemFile(t, s, 8<<20)

	m.grow(24 << 20)
	if err := s.Resized("vol"); err != nil {
		t.Fatal(err)
	}
	if err := dev.Resize(); err != nil {
		t.Fatal(err)
	}
	if size, err := dev.Size(); err != nil || size != 24<<20 {
		t.Fatalf("loop size after resize: %d, %v; want %d", size, err, 24<<20)
	}
	if err := dev.Sync(); err != nil {
		t.Fatal(err)
	}
}

// TestUnmountWhileAttached: a loop device keeps the mount busy, so Unmount
// detaches it lazily; the server keeps serving the loop device, and stops
// once the loop device lets go of the file.
func TestUnmountWhileAttached(t *testing.T) { eachTransport(t, testUnmountWhileAttached) }

func testUnmountWhileAttached(t *testing.T, o Options) {
	s := mount(t, o)
	m, dev := loopOnMemFile(t, s, 4<<20)

	if err := s.Unmount(); err != nil {
		t.Fatalf("Unmount while a loop device is attached: %v", err)
	}
	if _, err := os.Stat(s.Path("vol")); err == nil {
		t.Fatal("file still reachable at the mount point after Unmount")
	}
	// The loop device still works.
	fd, err := unix.Open(dev.Path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	w := pattern(4096, 5)
	_, err = unix.Pwrite(fd, w, 8192)
	if err == nil {
		err = unix.Fsync(fd)
	}
	unix.Close(fd)
	if err != nil {
		t.Fatalf("I/O after lazy unmount: %v", err)
	}
	if !bytes.Equal(m.bytes(8192, len(w)), w) {
		t.Fatal("write after lazy unmount did not reach the BlockFile")
	}

	// Detach finds its device although the file's path is gone.
	if err := dev.Detach(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-s.served:
	case <-time.After(10 * time.Second):
		t.Fatal("server still serving 10s after the last user went away")
	}
}
