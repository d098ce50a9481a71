package faultfs

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

func page(b byte) []byte { return bytes.Repeat([]byte{b}, PageSize) }

// setup makes root/d with file f holding page 1 synced (file and
// directory), then page 2 written at offset 0 and page 3 at PageSize,
// not synced.
func setup(t *testing.T) (fs *FS, root string, f *os.File) {
	t.Helper()
	root = t.TempDir()
	if err := os.Mkdir(filepath.Join(root, "d"), 0o700); err != nil {
		t.Fatal(err)
	}
	fs, err := New(root, 1)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(root, "d", "f")
	f, err = os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if err := fs.Opened(path, f, os.O_RDWR|os.O_CREATE); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, fs, f, page(1), 0)
	if err := fs.Fdatasync(f); err != nil {
		t.Fatal(err)
	}
	if err := fs.SyncDir(filepath.Join(root, "d")); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, fs, f, page(2), 0)
	mustWrite(t, fs, f, page(3), PageSize)
	return fs, root, f
}

func mustWrite(t *testing.T, fs *FS, f *os.File, p []byte, off int64) {
	t.Helper()
	if _, err := fs.WriteAt(f, p, off); err != nil {
		t.Fatal(err)
	}
}

func read(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestCutDropKeep(t *testing.T) {
	fs, root, _ := setup(t)
	drop, keep := t.TempDir()+"/drop", t.TempDir()+"/keep"
	if err := fs.Cut(root, drop, Drop); err != nil {
		t.Fatal(err)
	}
	if err := fs.Cut(root, keep, Keep); err != nil {
		t.Fatal(err)
	}
	if got := read(t, filepath.Join(drop, "d", "f")); !bytes.Equal(got, page(1)) {
		t.Errorf("drop: %d bytes starting %x, want the synced page", len(got), got[:1])
	}
	if got := read(t, filepath.Join(keep, "d", "f")); !bytes.Equal(got, append(page(2), page(3)...)) {
		t.Errorf("keep: %d bytes, want both unsynced pages", len(got))
	}
	if _, err := fs.WriteAt(nil, page(4), 0); !errors.Is(err, syscall.EIO) {
		t.Errorf("write after the cut: %v, want EIO", err)
	}
}

func TestFailedSyncMarksClean(t *testing.T) {
	fs, root, f := setup(t)
	fs.FailSyncAfter(1)
	if err := fs.Fdatasync(f); !errors.Is(err, syscall.EIO) {
		t.Fatalf("failing sync: %v, want EIO", err)
	}
	if err := fs.Fdatasync(f); err != nil {
		t.Fatalf("sync after the failed one: %v (Linux reports a writeback error once)", err)
	}
	// The pages are clean: whatever reached the disk or not stays so.
	a, b := t.TempDir()+"/a", t.TempDir()+"/b"
	if err := fs.Cut(root, a, Drop); err != nil {
		t.Fatal(err)
	}
	if err := fs.Cut(root, b, Keep); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(read(t, filepath.Join(a, "d", "f")), read(t, filepath.Join(b, "d", "f"))) {
		t.Error("a cut after a failed sync still chooses for its pages")
	}
}

func TestUnsyncedEntries(t *testing.T) {
	fs, root, _ := setup(t)
	dir := filepath.Join(root, "d")
	g, err := os.OpenFile(filepath.Join(dir, "g"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if err := fs.Opened(filepath.Join(dir, "g"), g, os.O_RDWR|os.O_CREATE); err != nil {
		t.Fatal(err)
	}
	if err := fs.Fsync(g); err != nil {
		t.Fatal(err)
	}
	if err := fs.Rename(filepath.Join(dir, "g"), filepath.Join(dir, "f")); err != nil {
		t.Fatal(err)
	}
	drop, keep := t.TempDir()+"/drop", t.TempDir()+"/keep"
	if err := fs.Cut(root, drop, Drop); err != nil {
		t.Fatal(err)
	}
	if err := fs.Cut(root, keep, Keep); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(drop, "d", "g")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("drop: a file whose entry was never synced exists: %v", err)
	}
	if got := read(t, filepath.Join(drop, "d", "f")); !bytes.Equal(got, page(1)) {
		t.Error("drop: the rename over f happened without a directory sync")
	}
	if got := read(t, filepath.Join(keep, "d", "f")); len(got) != 0 {
		t.Errorf("keep: f is %d bytes, want the empty file renamed over it", len(got))
	}
}
