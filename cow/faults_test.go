package cow_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/cowcsi/cowcsi/cow"
	"github.com/cowcsi/cowcsi/cow/internal/faultfs"
)

// faultStore opens a store in a new directory with its file I/O through a
// faultfs.FS, without background merges.
func faultStore(t *testing.T) (dir string, ff *faultfs.FS, s *cow.Store) {
	t.Helper()
	dir = filepath.Join(fastTempDir(t), "store")
	if err := os.MkdirAll(filepath.Join(dir, "layers"), 0o700); err != nil {
		t.Fatal(err)
	}
	ff, err := faultfs.New(dir, testSeed(t))
	if err != nil {
		t.Fatal(err)
	}
	s, err = cow.Open(dir, cow.Options{Faults: ff, NoBackgroundMerge: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return dir, ff, s
}

func fill(b byte) []byte { return bytes.Repeat([]byte{b}, cow.BlockSize) }

// Finding 5: after an fdatasync of a layer fails, Linux has marked its
// pages clean, so a retried fdatasync succeeds whether or not the data
// reached the disk. The volume must refuse writes and flushes with EIO
// from then on, and never report a later flush as a success.
func TestFlushAfterSyncEIOFails(t *testing.T) {
	ctx := t.Context()
	dir, ff, s := faultStore(t)
	if _, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: "v", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	v, err := s.OpenVolume(ctx, "v")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(0xAA), 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(0xBB), 0); err != nil {
		t.Fatal(err)
	}
	ff.FailSyncAfter(1)
	if err := v.Flush(); !errors.Is(err, syscall.EIO) {
		t.Fatalf("flush with a failing fdatasync: %v, want EIO", err)
	}
	if failed := ff.FailedSyncs(); len(failed) != 1 || !strings.HasSuffix(failed[0], ".data") {
		t.Fatalf("failed syncs %v, want the layer's data file", failed)
	}
	if err := v.Flush(); !errors.Is(err, syscall.EIO) {
		t.Fatalf("flush after a failed fdatasync: %v, want EIO until the store is reopened", err)
	}
	if _, err := v.WriteAt(fill(0xCC), cow.BlockSize); !errors.Is(err, syscall.EIO) {
		t.Fatalf("write after a failed fdatasync: %v, want EIO", err)
	}
	if err := v.Discard(0, cow.BlockSize); !errors.Is(err, syscall.EIO) {
		t.Fatalf("discard after a failed fdatasync: %v, want EIO", err)
	}
	if _, err := s.CreateSnapshot(ctx, cow.SnapshotSpec{ID: "s", VolumeID: "v"}); !errors.Is(err, syscall.EIO) {
		t.Fatalf("snapshot after a failed fdatasync: %v, want EIO", err)
	}
	if err := v.Close(); !errors.Is(err, syscall.EIO) {
		t.Fatalf("close after a failed fdatasync: %v, want EIO", err)
	}
	s.Close()
	next := dir + "-cut"
	if err := ff.Cut(dir, next, faultfs.Drop); err != nil {
		t.Fatal(err)
	}
	s2 := openStore(t, next)
	mustCheck(t, s2)
	got := readVolume(ctx, t, s2, "v")[:cow.BlockSize]
	if !bytes.Equal(got, fill(0xAA)) && !bytes.Equal(got, fill(0xBB)) {
		t.Fatalf("block 0 after reopening: %s; want the flushed or the failed write", diffAt(got, fill(0xAA)))
	}
	v2, err := s2.OpenVolume(ctx, "v")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v2.WriteAt(fill(0xDD), 0); err != nil {
		t.Fatalf("write after reopening: %v", err)
	}
	if err := v2.Flush(); err != nil {
		t.Fatalf("flush after reopening: %v", err)
	}
}

// Finding 6: a flush whose journal records straddle a page boundary is cut
// after the later page reached the disk and before the earlier one did.
// Open stops at the zero record; the record behind the gap must not come
// back once later appends fill the gap, pointing its block at file space
// that was reclaimed and given to another block.
func TestJournalTailBehindGap(t *testing.T) {
	ctx := t.Context()
	dir, ff, s := faultStore(t)
	if _, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: "v", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	v, err := s.OpenVolume(ctx, "v")
	if err != nil {
		t.Fatal(err)
	}
	// 126 records of one block each after the 32-byte header: the next
	// record starts at 4064, the one after it on the journal's second page.
	for b := int64(0); b < 126; b++ {
		if _, err := v.WriteAt(fill(byte(b)), 2*b*cow.BlockSize); err != nil {
			t.Fatal(err)
		}
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(0xB1), 1*cow.BlockSize); err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(0xB3), 3*cow.BlockSize); err != nil {
		t.Fatal(err)
	}
	// The flush: data fdatasync, journal growth, records, journal
	// fdatasync, which the power cut stops.
	ff.CutAfter(4)
	if err := v.Flush(); err == nil {
		t.Fatal("flush across the power cut succeeded")
	}
	s.Close()
	next := dir + "-cut"
	err = ff.CutPages(dir, next, func(path string, page int64) bool {
		return !strings.HasSuffix(path, ".map") || page != 0
	})
	if err != nil {
		t.Fatal(err)
	}
	// Reopened: blocks 1 and 3 were never flushed. Blocks 253 and 254,
	// both new, in one record fill the gap and take the file space block
	// 3's lost record named.
	s2 := openStore(t, next)
	mustCheck(t, s2)
	v2, err := s2.OpenVolume(ctx, "v")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v2.WriteAt(append(fill(0xB5), fill(0xB6)...), 253*cow.BlockSize); err != nil {
		t.Fatal(err)
	}
	if err := v2.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s2.Close(); err != nil {
		t.Fatal(err)
	}
	s3 := openStore(t, next)
	if err := s3.Check(); err != nil {
		t.Errorf("Check after the gap was filled: %v", err)
	}
	data := readVolume(ctx, t, s3, "v")
	for _, b := range []int64{1, 3} {
		got := data[b*cow.BlockSize : (b+1)*cow.BlockSize]
		if !bytes.Equal(got, make([]byte, cow.BlockSize)) && !bytes.Equal(got, fill(0xB0+byte(b))) {
			t.Errorf("block %d, written but never flushed: %s; want zeros or its own write", b, diffAt(got, make([]byte, cow.BlockSize)))
		}
	}
	if got := data[254*cow.BlockSize : 255*cow.BlockSize]; !bytes.Equal(got, fill(0xB6)) {
		t.Errorf("block 254: %s", diffAt(got, fill(0xB6)))
	}
}

// noSpaceWorkload walks the engine's write paths once: first writes (file
// creation), in-place and partial writes, discards, a snapshot, a clone,
// a deleted snapshot merged away, flushes. It stops at the first error.
func noSpaceWorkload(ctx context.Context, s *cow.Store) error {
	if _, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: "v", Size: 1 << 20}); err != nil {
		return err
	}
	v, err := s.OpenVolume(ctx, "v")
	if err != nil {
		return err
	}
	defer v.Close()
	steps := []func() error{
		func() error { _, err := v.WriteAt(bytes.Repeat([]byte{1}, 40*cow.BlockSize), 0); return err },
		v.Flush,
		func() error { _, err := v.WriteAt(fill(2), 3*cow.BlockSize); return err },
		func() error {
			_, err := s.CreateSnapshot(ctx, cow.SnapshotSpec{ID: "s", VolumeID: "v"})
			return err
		},
		func() error { _, err := v.WriteAt(bytes.Repeat([]byte{3}, 700), 5*cow.BlockSize+100); return err },
		func() error { return v.Discard(8*cow.BlockSize, 4*cow.BlockSize) },
		func() error { _, err := v.WriteAt(bytes.Repeat([]byte{4}, 300<<10), 64*cow.BlockSize); return err },
		v.Flush,
		func() error {
			_, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: "c", Size: 1 << 20, SourceVolume: "v"})
			return err
		},
		func() error { _, err := v.WriteAt(fill(5), 6*cow.BlockSize); return err },
		func() error { return s.DeleteSnapshot(ctx, "s") },
		func() error { return s.WaitIdle(ctx) },
		v.Flush,
		func() error { return s.DeleteVolume(ctx, "c") },
		func() error { return s.WaitIdle(ctx) },
	}
	for _, step := range steps {
		if err := step(); err != nil {
			return err
		}
	}
	return nil
}

// ENOSPC at any write: for every write and growing truncate the workload
// makes, in turn, the disk is full from that one on. The engine must report
// ErrNoSpace, keep a store that passes Check once there is room again, and
// reopen clean.
func TestNoSpaceAtEveryWrite(t *testing.T) {
	ctx := t.Context()
	base := fastTempDir(t)
	seed := testSeed(t)
	for k := int64(1); ; k++ {
		dir := filepath.Join(base, fmt.Sprintf("store%d", k))
		if err := os.MkdirAll(filepath.Join(dir, "layers"), 0o700); err != nil {
			t.Fatal(err)
		}
		ff, err := faultfs.New(dir, seed+k)
		if err != nil {
			t.Fatal(err)
		}
		ff.NoSpaceAfter(k, -1)
		s, err := cow.Open(dir, cow.Options{Faults: ff, NoBackgroundMerge: true})
		if err == nil {
			err = noSpaceWorkload(ctx, s)
			ff.NoSpaceAfter(1<<40, 0)
			if cerr := s.Check(); cerr != nil {
				t.Errorf("disk full from write %d: Check once there is room: %v", k, cerr)
			}
			s.Close()
		}
		if err == nil {
			if k == 1 {
				t.Fatal("the workload succeeded with the disk full from its first write: ENOSPC was never injected")
			}
			t.Logf("the workload makes %d writes; ENOSPC tried at each", k-1)
			return
		}
		if !errors.Is(err, cow.ErrNoSpace) {
			t.Fatalf("disk full from write %d: %v, want ErrNoSpace", k, err)
		}
		s2, err := cow.Open(dir, cow.Options{NoBackgroundMerge: true})
		if err != nil {
			t.Fatalf("disk full from write %d: reopen: %v", k, err)
		}
		if err := s2.Check(); err != nil {
			t.Errorf("disk full from write %d: Check after reopening: %v", k, err)
		}
		s2.Close()
		if t.Failed() {
			return
		}
	}
}

// A catalog commit whose fdatasync fails may have reached the disk anyway
// (Linux marks the pages clean either way). CreateSnapshot reports the
// failure, so the snapshot must not appear after a power cut, holding
// writes made after it failed.
func TestCatalogSyncEIOForgetsCommit(t *testing.T) {
	ctx := t.Context()
	dir, ff, s := faultStore(t)
	if _, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: "v", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	v, err := s.OpenVolume(ctx, "v")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v.WriteAt(fill(0xAA), 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	// The head is clean: the only sync is the catalog's, and its pages
	// reach the disk although it fails.
	ff.FailSyncAfterMode(1, faultfs.Keep)
	if _, err := s.CreateSnapshot(ctx, cow.SnapshotSpec{ID: "s", VolumeID: "v"}); !errors.Is(err, syscall.EIO) {
		t.Fatalf("snapshot with a failing catalog fdatasync: %v, want EIO", err)
	}
	if failed := ff.FailedSyncs(); len(failed) != 1 || !strings.Contains(failed[0], "catalog.log") {
		t.Fatalf("failed syncs %v, want the catalog", failed)
	}
	if _, err := v.WriteAt(fill(0xBB), 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	s.Close()
	next := dir + "-cut"
	if err := ff.Cut(dir, next, faultfs.Drop); err != nil {
		t.Fatal(err)
	}
	s2 := openStore(t, next)
	mustCheck(t, s2)
	if _, err := s2.GetSnapshot("s"); !errors.Is(err, cow.ErrNotFound) {
		t.Errorf("snapshot whose CreateSnapshot failed, after a power cut: %v, want ErrNotFound", err)
	}
	if got := readVolume(ctx, t, s2, "v")[:cow.BlockSize]; !bytes.Equal(got, fill(0xBB)) {
		t.Errorf("block 0 after the cut: %s", diffAt(got, fill(0xBB)))
	}
}
