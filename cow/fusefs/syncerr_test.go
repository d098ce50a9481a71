package fusefs

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/cow"
	"github.com/cowcsi/cowcsi/cow/internal/faultfs"
)

// TestEngineSyncErrorReachesApp serves an engine volume whose store's
// fdatasync fails once with EIO (faultfs): the application's fsync must
// fail with EIO, and so must every later write and fsync (the engine
// refuses them until the store is reopened), never a later success over
// data that may not be on disk.
func TestEngineSyncErrorReachesApp(t *testing.T) { eachTransport(t, testEngineSyncErrorReachesApp) }

func testEngineSyncErrorReachesApp(t *testing.T, o Options) {
	s := mount(t, o)
	dir := filepath.Join(t.TempDir(), "store")
	if err := os.MkdirAll(filepath.Join(dir, "layers"), 0o700); err != nil {
		t.Fatal(err)
	}
	ff, err := faultfs.New(dir, 1)
	if err != nil {
		t.Fatal(err)
	}
	store, err := cow.Open(dir, cow.Options{Faults: ff})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	ctx := t.Context()
	if _, err := store.CreateVolume(ctx, cow.VolumeSpec{ID: "v", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	v, err := store.OpenVolume(ctx, "v")
	if err != nil {
		t.Fatal(err)
	}
	add(t, s, "vol", v, false)
	t.Cleanup(func() { _ = s.Remove("vol") })
	fd := openFile(t, s.Path("vol"), unix.O_RDWR)
	if _, err := unix.Pwrite(fd, pattern(8192, 1), 0); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fsync(fd); err != nil {
		t.Fatal(err)
	}
	if _, err := unix.Pwrite(fd, pattern(8192, 2), 0); err != nil {
		t.Fatal(err)
	}
	ff.FailSyncAfter(1)
	if err := unix.Fsync(fd); !errors.Is(err, unix.EIO) {
		t.Fatalf("fsync with the engine's fdatasync failing: %v, want EIO", err)
	}
	if err := unix.Fsync(fd); !errors.Is(err, unix.EIO) {
		t.Fatalf("fsync after a failed one: %v, want EIO", err)
	}
	if _, err := unix.Pwrite(fd, pattern(4096, 3), 8192); !errors.Is(err, unix.EIO) {
		t.Fatalf("write after a failed fsync: %v, want EIO", err)
	}
	if err := unix.Fsync(fd); !errors.Is(err, unix.EIO) {
		t.Fatalf("fsync after a failed write: %v, want EIO", err)
	}
}
