package cow_test

import (
	"context"
	"errors"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cowcsi/cowcsi/cow"
	"github.com/cowcsi/cowcsi/test/testutil"
)

// mountSmallExt4 makes an ext4 filesystem of size bytes in a file, attaches
// it to a free loop device, mounts it and returns the mount point. Unmount
// and detach are registered with t.Cleanup, so they run on every path (after
// the cleanups of anything opened on the filesystem later).
func mountSmallExt4(t *testing.T, size int64) string {
	t.Helper()
	testutil.RequireRoot(t)
	for _, tool := range []string{"mkfs.ext4", "losetup", "mount", "umount"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("skipping: %s not found (install e2fsprogs, util-linux, mount)", tool)
		}
	}
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		t.Skipf("skipping: no loop device support: %v", err)
	}
	run := func(ctx context.Context, name string, args ...string) (string, error) {
		out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
		return strings.TrimSpace(string(out)), err
	}
	ctx := t.Context()
	img := filepath.Join(t.TempDir(), "fs.img")
	mnt := t.TempDir()
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := errors.Join(f.Truncate(size), f.Close()); err != nil {
		t.Fatal(err)
	}
	// -m 0: no blocks reserved for root, so root (the test) sees ENOSPC too.
	if out, err := run(ctx, "mkfs.ext4", "-q", "-F", "-m", "0", img); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	dev, err := run(ctx, "losetup", "-f", "--show", img)
	if err != nil {
		t.Fatalf("losetup -f --show: %v: %s", err, dev)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if out, err := run(ctx, "losetup", "-d", dev); err != nil {
			t.Errorf("losetup -d %s: %v: %s", dev, err, out)
		}
	})
	if out, err := run(ctx, "mount", "-t", "ext4", dev, mnt); err != nil {
		t.Fatalf("mount %s: %v: %s", dev, err, out)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if out, err := run(ctx, "umount", mnt); err != nil {
			t.Errorf("umount %s: %v: %s; detaching lazily", mnt, err, out)
			run(ctx, "umount", "-l", mnt)
		}
	})
	return mnt
}

// chunkData returns the deterministic contents of chunk i of a test volume.
func chunkData(seed int64, i, n int) []byte {
	p := make([]byte, n)
	rand.New(rand.NewSource(seed ^ int64(i)*0x5851F42D4C957F2D)).Read(p)
	return p
}

// TestNoSpace fills the filesystem under a store until the engine reports
// ErrNoSpace, then checks that flushed data survived, that freeing space
// makes the store writable again, and that it reopens consistent.
func TestNoSpace(t *testing.T) {
	mnt := mountSmallExt4(t, 64<<20)
	seed := testSeed(t)
	ctx := t.Context()
	dir := filepath.Join(mnt, "store")
	s := openStore(t, dir)
	const chunk = 1 << 20

	// A volume whose flushed data must survive the full filesystem, with a
	// snapshot below it.
	keep := make([]byte, 8<<20)
	mustWrite := func(v *cow.Volume, off int64, p []byte) {
		t.Helper()
		if _, err := v.WriteAt(p, off); err != nil {
			t.Fatalf("WriteAt(%s, %d, %d): %v", v.ID(), off, len(p), err)
		}
		copy(keep[off:], p) // only used for "keep"
	}
	if _, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: "keep", Size: int64(len(keep))}); err != nil {
		t.Fatalf("CreateVolume(keep): %v", err)
	}
	kv, err := s.OpenVolume(ctx, "keep")
	if err != nil {
		t.Fatalf("OpenVolume(keep): %v", err)
	}
	for i := range 4 {
		mustWrite(kv, int64(i)*chunk, chunkData(seed, -1-i, chunk))
	}
	if _, err := s.CreateSnapshot(ctx, cow.SnapshotSpec{ID: "keep-snap", VolumeID: "keep"}); err != nil {
		t.Fatalf("CreateSnapshot(keep-snap): %v", err)
	}
	mustWrite(kv, chunk/2+123, chunkData(seed, -10, chunk))
	if err := kv.Flush(); err != nil {
		t.Fatalf("Flush(keep): %v", err)
	}

	// Fill the rest with a volume much larger than the filesystem.
	if _, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: "fill", Size: 256 << 20}); err != nil {
		t.Fatalf("CreateVolume(fill): %v", err)
	}
	fv, err := s.OpenVolume(ctx, "fill")
	if err != nil {
		t.Fatalf("OpenVolume(fill): %v", err)
	}
	flushed, full := 0, false // chunks of fill known durable
	for i := 0; i < 256 && !full; i++ {
		_, err := fv.WriteAt(chunkData(seed, i, chunk), int64(i)*chunk)
		if err == nil && i%4 == 3 {
			if err = fv.Flush(); err == nil {
				flushed = i + 1
			}
		}
		if err != nil {
			if !errors.Is(err, cow.ErrNoSpace) {
				t.Fatalf("filling chunk %d: %v, want an error wrapping ErrNoSpace", i, err)
			}
			t.Logf("ErrNoSpace after %d MiB (%d MiB flushed): %v", i, flushed, err)
			full = true
		}
	}
	if !full {
		t.Fatalf("wrote 256 MiB to a 64 MiB filesystem without ErrNoSpace")
	}
	if total, free, err := s.Capacity(); err != nil || total <= 0 || free < 0 || free > total/8 {
		t.Errorf("Capacity on a full filesystem = %d, %d, %v; want total > 0 and little free", total, free, err)
	}

	mustCheck(t, s)

	// Catalog operations on the full filesystem either work or fail with
	// ErrNoSpace and leave nothing behind.
	if _, err := s.CreateSnapshot(ctx, cow.SnapshotSpec{ID: "full-snap", VolumeID: "keep"}); err != nil {
		if !errors.Is(err, cow.ErrNoSpace) {
			t.Fatalf("CreateSnapshot on a full filesystem: %v, want nil or ErrNoSpace", err)
		}
		if _, err := s.GetSnapshot("full-snap"); !errors.Is(err, cow.ErrNotFound) {
			t.Errorf("GetSnapshot after a failed CreateSnapshot: %v, want ErrNotFound", err)
		}
	}
	if _, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: "full-vol", Size: 1 << 20}); err != nil {
		if !errors.Is(err, cow.ErrNoSpace) {
			t.Fatalf("CreateVolume on a full filesystem: %v, want nil or ErrNoSpace", err)
		}
		if _, err := s.GetVolume("full-vol"); !errors.Is(err, cow.ErrNotFound) {
			t.Errorf("GetVolume after a failed CreateVolume: %v, want ErrNotFound", err)
		}
	}
	mustCheck(t, s)

	// Everything flushed before is intact.
	if d := diffAt(readAll(t, kv), keep); d != "" {
		t.Fatalf("keep after ErrNoSpace: %s", d)
	}
	checkFill := func(v *cow.Volume) {
		t.Helper()
		for i := range flushed {
			p := make([]byte, chunk)
			if _, err := v.ReadAt(p, int64(i)*chunk); err != nil {
				t.Fatalf("ReadAt(fill, chunk %d): %v", i, err)
			}
			if d := diffAt(p, chunkData(seed, i, chunk)); d != "" {
				t.Fatalf("fill chunk %d (flushed before ErrNoSpace): %s", i, d)
			}
		}
	}
	checkFill(fv)

	// Free space: close and delete the filler (Close flushes, which may still
	// fail for lack of space), then delete the snapshot under keep.
	if err := fv.Close(); err != nil && !errors.Is(err, cow.ErrNoSpace) {
		t.Fatalf("Close(fill) on a full filesystem: %v, want nil or ErrNoSpace", err)
	}
	if err := s.DeleteVolume(ctx, "fill"); err != nil {
		t.Fatalf("DeleteVolume(fill) on a full filesystem: %v", err)
	}
	if err := s.DeleteSnapshot(ctx, "keep-snap"); err != nil {
		t.Fatalf("DeleteSnapshot(keep-snap): %v", err)
	}
	if err := s.WaitIdle(ctx); err != nil {
		t.Fatalf("WaitIdle: %v", err)
	}
	if _, free, err := s.Capacity(); err != nil || free < 32<<20 {
		t.Errorf("Capacity after deleting the filler: free %d, %v; want at least 32 MiB", free, err)
	}

	// Writes work again.
	for i := range 4 {
		mustWrite(kv, int64(4+i)*chunk, chunkData(seed, -20-i, chunk))
	}
	if err := kv.Flush(); err != nil {
		t.Fatalf("Flush(keep) after freeing space: %v", err)
	}
	if _, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: "after", Size: 16 << 20}); err != nil {
		t.Fatalf("CreateVolume(after) after freeing space: %v", err)
	}
	av, err := s.OpenVolume(ctx, "after")
	if err != nil {
		t.Fatalf("OpenVolume(after): %v", err)
	}
	for i := range 16 {
		if _, err := av.WriteAt(chunkData(seed, 1000+i, chunk), int64(i)*chunk); err != nil {
			t.Fatalf("WriteAt(after, chunk %d) after freeing space: %v", i, err)
		}
	}
	if err := errors.Join(av.Close(), kv.Close()); err != nil {
		t.Fatalf("Close after freeing space: %v", err)
	}

	// Reopen, check, verify.
	s = reopenStore(t, s, cow.Options{})
	mustCheck(t, s)
	if d := diffAt(readVolume(ctx, t, s, "keep"), keep); d != "" {
		t.Fatalf("keep after reopen: %s", d)
	}
	after := readVolume(ctx, t, s, "after")
	for i := range 16 {
		if d := diffAt(after[i*chunk:(i+1)*chunk], chunkData(seed, 1000+i, chunk)); d != "" {
			t.Fatalf("after chunk %d after reopen: %s", i, d)
		}
	}
	if _, err := s.GetVolume("fill"); !errors.Is(err, cow.ErrNotFound) {
		t.Errorf("GetVolume(fill) after delete and reopen: %v, want ErrNotFound", err)
	}
}
