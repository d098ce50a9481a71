package loopdev

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/test/testutil"
)

// sparseFile creates a sparse file of size bytes in a test directory.
func sparseFile(t *testing.T, size int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "backing.img")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return p
}

// attach attaches and registers the detach, so the device goes away on
// every path out of the test.
func attach(t *testing.T, backing string, opts Options) *Device {
	t.Helper()
	d, err := Attach(context.Background(), backing, opts)
	if err != nil {
		t.Fatalf("Attach(%s, %+v): %v", backing, opts, err)
	}
	t.Cleanup(func() {
		if err := d.Detach(); err != nil {
			t.Errorf("cleanup Detach %s: %v", d.Path, err)
		}
	})
	return d
}

// alignedBuf returns a size-byte buffer aligned for O_DIRECT.
func alignedBuf(size int) []byte {
	const align = 4096
	b := make([]byte, size+align)
	off := int(uintptr(unsafe.Pointer(&b[0])) & (align - 1))
	if off != 0 {
		off = align - off
	}
	return b[off : off+size]
}

func TestAttachReadWrite(t *testing.T) {
	testutil.RequireRoot(t, testutil.DevLoopControl)
	backing := sparseFile(t, 16<<20)
	d := attach(t, backing, Options{DirectIO: true, LogicalBlockSize: 4096})
	if d.Number < 0 || d.Path != devPath(d.Number) {
		t.Fatalf("device %+v: inconsistent path and number", d)
	}
	t.Logf("%s direct I/O: %v", d.Path, d.DirectIO())

	fd, err := unix.Open(d.Path, unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	const off = 3 << 20
	w := alignedBuf(64 << 10)
	for i := range w {
		w[i] = byte(i*7 + 1)
	}
	if n, err := unix.Pwrite(fd, w, off); err != nil || n != len(w) {
		t.Fatalf("pwrite through %s: n=%d err=%v", d.Path, n, err)
	}
	if err := d.Sync(); err != nil {
		t.Fatal(err)
	}
	r := alignedBuf(len(w))
	if n, err := unix.Pread(fd, r, off); err != nil || n != len(r) {
		t.Fatalf("pread through %s: n=%d err=%v", d.Path, n, err)
	}
	if !bytes.Equal(r, w) {
		t.Fatal("data read through the device differs from data written")
	}

	got := make([]byte, len(w))
	f, err := os.Open(backing)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(got, off); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, w) {
		t.Fatal("data written through the device did not land in the backing file")
	}
}

func TestReadOnlyRejectsWrites(t *testing.T) {
	testutil.RequireRoot(t, testutil.DevLoopControl)
	backing := sparseFile(t, 4<<20)
	d := attach(t, backing, Options{ReadOnly: true, LogicalBlockSize: 4096})
	if !d.ReadOnly {
		t.Fatal("Device.ReadOnly = false for a read-only attach")
	}
	fd, err := unix.Open(d.Path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err == nil {
		// Some kernels let the open through and fail the write.
		defer unix.Close(fd)
		buf := make([]byte, 4096)
		if _, err := unix.Pwrite(fd, buf, 0); err == nil {
			t.Fatal("write to a read-only loop device succeeded")
		}
		return
	}
	if !errors.Is(err, unix.EACCES) && !errors.Is(err, unix.EROFS) {
		t.Fatalf("open read-only device for writing: %v, want EACCES or EROFS", err)
	}
}

func TestBlockSizeAndResize(t *testing.T) {
	testutil.RequireRoot(t, testutil.DevLoopControl)
	backing := sparseFile(t, 8<<20)
	d := attach(t, backing, Options{LogicalBlockSize: 4096})
	bs, err := d.LogicalBlockSize()
	if err != nil {
		t.Fatal(err)
	}
	if bs != 4096 {
		t.Fatalf("BLKSSZGET = %d, want 4096", bs)
	}
	if size, err := d.Size(); err != nil || size != 8<<20 {
		t.Fatalf("Size() = %d, %v; want %d", size, err, 8<<20)
	}

	if err := os.Truncate(backing, 24<<20); err != nil {
		t.Fatal(err)
	}
	if err := d.Resize(); err != nil {
		t.Fatal(err)
	}
	if size, err := d.Size(); err != nil || size != 24<<20 {
		t.Fatalf("Size() after Resize = %d, %v; want %d", size, err, 24<<20)
	}
}

func TestFindByBackingAndOpen(t *testing.T) {
	testutil.RequireRoot(t, testutil.DevLoopControl)
	backing := sparseFile(t, 4<<20)
	d := attach(t, backing, Options{LogicalBlockSize: 4096})

	found, err := FindByBacking(backing)
	if err != nil {
		t.Fatal(err)
	}
	if len(found) != 1 || found[0].Number != d.Number || found[0].Path != d.Path {
		t.Fatalf("FindByBacking = %v, want [%s]", found, d.Path)
	}

	o, err := Open(d.Path)
	if err != nil {
		t.Fatal(err)
	}
	if o.Number != d.Number || o.BackingFile != d.BackingFile || o.ReadOnly {
		t.Fatalf("Open(%s) = %+v, want number %d backed by %s", d.Path, o, d.Number, d.BackingFile)
	}

	if err := d.Detach(); err != nil {
		t.Fatal(err)
	}
	if err := d.Detach(); err != nil {
		t.Fatalf("second Detach: %v, want nil", err)
	}
	found, err = FindByBacking(backing)
	if err != nil || len(found) != 0 {
		t.Fatalf("FindByBacking after Detach = %v, %v; want none", found, err)
	}
	// Another test may have bound the number since; only our file must be
	// gone.
	if o, err := Open(d.Path); err == nil && o.BackingFile == d.BackingFile {
		t.Fatalf("Open(%s) after Detach still backed by %s", d.Path, backing)
	}
}

// TestSymlinkedBackingPath: the kernel reports the resolved path; Detach
// and FindByBacking must still recognize the device.
func TestSymlinkedBackingPath(t *testing.T) {
	testutil.RequireRoot(t, testutil.DevLoopControl)
	backing := sparseFile(t, 4<<20)
	link := filepath.Join(t.TempDir(), "link")
	if err := os.Symlink(filepath.Dir(backing), link); err != nil {
		t.Fatal(err)
	}
	viaLink := filepath.Join(link, filepath.Base(backing))
	d := attach(t, viaLink, Options{LogicalBlockSize: 4096})
	found, err := FindByBacking(viaLink)
	if err != nil || len(found) != 1 || found[0].Number != d.Number {
		t.Fatalf("FindByBacking(%s) = %v, %v; want [%s]", viaLink, found, err, d.Path)
	}
	if err := d.Detach(); err != nil {
		t.Fatal(err)
	}
	if found, _ := FindByBacking(backing); len(found) != 0 {
		t.Fatalf("Detach left the device attached: %v", found)
	}
}

func TestDetachWhileOpenIsDeferred(t *testing.T) {
	testutil.RequireRoot(t, testutil.DevLoopControl)
	backing := sparseFile(t, 4<<20)
	d := attach(t, backing, Options{LogicalBlockSize: 4096})
	fd, err := unix.Open(d.Path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	err = d.Detach()
	unix.Close(fd)
	if !errors.Is(err, ErrBusy) {
		t.Fatalf("Detach while open = %v, want ErrBusy", err)
	}
	// The kernel completes the detach on our close; Detach then agrees.
	if err := d.Detach(); err != nil {
		t.Fatalf("Detach after close: %v", err)
	}
	if found, _ := FindByBacking(backing); len(found) != 0 {
		t.Fatalf("still attached after last close: %v", found)
	}
}

// TestConcurrentAttach exercises the EBUSY retry: parallel attaches are
// handed the same free device by LOOP_CTL_GET_FREE.
func TestConcurrentAttach(t *testing.T) {
	testutil.RequireRoot(t, testutil.DevLoopControl)
	const n = 4
	devs := make([]*Device, n)
	errs := make([]error, n)
	files := make([]string, n)
	for i := range files {
		files[i] = sparseFile(t, 1<<20)
	}
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			devs[i], errs[i] = Attach(context.Background(), files[i], Options{LogicalBlockSize: 4096})
		})
	}
	wg.Wait()
	seen := map[int]bool{}
	for i, d := range devs {
		if d != nil {
			t.Cleanup(func() {
				if err := d.Detach(); err != nil {
					t.Errorf("cleanup Detach %s: %v", d.Path, err)
				}
			})
		}
		if errs[i] != nil {
			t.Errorf("Attach %d: %v", i, errs[i])
			continue
		}
		if seen[d.Number] {
			t.Errorf("device %s handed out twice", d.Path)
		}
		seen[d.Number] = true
	}
}

// TestBindingsAndClearFD covers the sysfs-only helpers: an attached device
// is listed under its backing file's directory, BackingFileOf names the
// file, and ClearFD unbinds it. (ClearFD is not called again on the freed
// number: another test on the machine may have been handed it.)
func TestBindingsAndClearFD(t *testing.T) {
	testutil.RequireRoot(t, testutil.DevLoopControl)
	backing := sparseFile(t, 4<<20)
	d := attach(t, backing, Options{})
	bound, err := BindingsUnder(filepath.Dir(backing))
	if err != nil {
		t.Fatal(err)
	}
	if len(bound) != 1 || bound[0].Path != d.Path || bound[0].BackingFile != d.BackingFile {
		t.Fatalf("BindingsUnder = %+v, want %s on %s", bound, d.Path, d.BackingFile)
	}
	if bf, err := BackingFileOf(d.Path); err != nil || bf != d.BackingFile {
		t.Fatalf("BackingFileOf(%s) = %q, %v; want %s", d.Path, bf, err, d.BackingFile)
	}
	if err := ClearFD(d.Path); err != nil {
		t.Fatal(err)
	}
	// The kernel finishes the detach on the last close, which may lag.
	deadline := time.Now().Add(busyWait)
	for {
		_, err := BackingFileOf(d.Path)
		if errors.Is(err, unix.ENXIO) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("BackingFileOf after ClearFD: %v, want ENXIO", err)
		}
		time.Sleep(5 * time.Millisecond) // polling kernel state
	}
	if bound, _ := BindingsUnder(filepath.Dir(backing)); len(bound) != 0 {
		t.Fatalf("BindingsUnder after ClearFD = %+v, want none", bound)
	}
}
