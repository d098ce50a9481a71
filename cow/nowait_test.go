package cow_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/cow"
)

// TestReadAtNoWait: data only on disk makes ReadAtNoWait fail with EAGAIN
// (the FUSE ring then reads it off its thread); once cached, and for blocks
// nobody wrote, it reads like ReadAt.
func TestReadAtNoWait(t *testing.T) {
	dir := t.TempDir()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	if st.Type == unix.TMPFS_MAGIC {
		t.Skip("tmpfs keeps file data in the page cache: nothing to wait for")
	}
	s := openStore(t, dir)
	ctx := context.Background()
	if _, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: "v", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	v, err := s.OpenVolume(ctx, "v")
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	data := bytes.Repeat([]byte("nowait!!"), 64<<10/8)
	if _, err := v.WriteAt(data, 64<<10); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}

	got := make([]byte, len(data))
	if _, err := v.ReadAtNoWait(got, 512<<10); err != nil || !bytes.Equal(got, make([]byte, len(got))) {
		t.Fatalf("ReadAtNoWait of blocks never written: %v, zeros=%v", err, bytes.Equal(got, make([]byte, len(got))))
	}

	// Drop the layer file's clean pages: the data is on disk only.
	files, err := filepath.Glob(filepath.Join(dir, "layers", "*.data"))
	if err != nil || len(files) == 0 {
		t.Fatalf("layer data files: %v, %v", files, err)
	}
	for _, p := range files {
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		err = unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	if _, err := v.ReadAtNoWait(got, 64<<10); !errors.Is(err, syscall.EAGAIN) {
		t.Fatalf("ReadAtNoWait of data on disk only: %v, want EAGAIN", err)
	}
	if _, err := v.ReadAt(got, 64<<10); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("ReadAt: %v, equal=%v", err, bytes.Equal(got, data))
	}
	clear(got)
	if _, err := v.ReadAtNoWait(got, 64<<10); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("ReadAtNoWait once cached: %v, equal=%v", err, bytes.Equal(got, data))
	}
}

// TestReadsLeaveAtime: reading a volume does not write the layer files'
// inodes (O_NOATIME). Under relatime a read updates an atime older than
// the mtime, which is what the test sets up.
func TestReadsLeaveAtime(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir)
	ctx := context.Background()
	if _, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: "v", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	v, err := s.OpenVolume(ctx, "v")
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if _, err := v.WriteAt(bytes.Repeat([]byte("atime..."), 8192/8), 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	files, err := filepath.Glob(filepath.Join(dir, "layers", "*.data"))
	if err != nil || len(files) == 0 {
		t.Fatalf("layer data files: %v, %v", files, err)
	}
	old := time.Now().Add(-48 * time.Hour).Truncate(time.Second)
	for _, p := range files {
		if err := os.Chtimes(p, old, time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	buf := make([]byte, 8192)
	if _, err := v.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	for _, p := range files {
		var st unix.Stat_t
		if err := unix.Stat(p, &st); err != nil {
			t.Fatal(err)
		}
		if got := time.Unix(st.Atim.Unix()); !got.Equal(old) {
			t.Errorf("%s: atime %v after a read, want it left at %v", filepath.Base(p), got, old)
		}
	}
}
