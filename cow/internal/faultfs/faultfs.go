// Package faultfs is the engine's file I/O, with faults that tests inject:
// a power cut that drops, tears or reorders what was not yet synced, an
// fdatasync that fails with EIO, and ENOSPC at any write, as bbolt's
// failpoints and Jepsen's LazyFS do. There is no device-mapper under the
// tests, so it works at the file layer.
//
// A nil *FS does plain I/O: each method is a nil check and the system call,
// with no allocation, so the engine's data path costs what it cost before
// the seam (one more direct call per I/O). A non-nil FS still does every write to
// the real files, so the process reads back what it wrote, as through the
// page cache; beside that it keeps a model of what has reached the disk:
// per file, the pages and size its last fsync or fdatasync made durable
// and every change since, per directory, the entries its last fsync made
// durable and every change since. Cut freezes the model and writes one
// possible disk state after a power cut into another directory. Syncs are
// not passed to the real files: the model is the disk.
package faultfs

import (
	"errors"
	"math/rand"
	"os"
	"path/filepath"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// PageSize is the unit in which writes reach the disk, or do not.
const PageSize = 4096

// FS is file I/O with faults; see the package documentation.
type FS struct {
	mu    sync.Mutex
	rng   *rand.Rand
	files map[fileKey]*file // live inodes
	dirs  map[string]*dir   // by absolute path
	// ops counts the changes (writes, syncs, truncates, punches, creates,
	// removes, renames); the change numbered cutAt and every later one
	// fail with EIO without taking effect: the power went.
	ops, cutAt int64
	dead       bool
	// syncs counts syncs; the one numbered failSync fails with EIO.
	syncs, failSync int64
	failMode        CutMode // what of the failed sync's pages reached the disk
	failedSyncs     []string
	// writes counts writes and growing truncates; those numbered
	// [noSpaceFrom, noSpaceTo) fail with ENOSPC.
	writes, noSpaceFrom, noSpaceTo int64
}

// fileKey is an inode; two descriptors of one file (the O_DIRECT twin of a
// data file) share it.
type fileKey struct{ dev, ino uint64 }

// New returns an FS whose model starts from the files under root as they
// are, all taken as durable. seed drives the choices it makes: which pages
// a failed sync or a cut keeps.
func New(root string, seed int64) (*FS, error) {
	fs := &FS{rng: rand.New(rand.NewSource(seed)), files: map[fileKey]*file{}, dirs: map[string]*dir{}}
	root, err := filepath.Abs(root)
	if err != nil {
		return nil, err
	}
	err = filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			fs.dirOf(path)
			return nil
		}
		if !d.Type().IsRegular() {
			return nil
		}
		f, err := fs.adopt(path)
		if err != nil {
			return err
		}
		dd := fs.dirOf(filepath.Dir(path))
		dd.cur[filepath.Base(path)] = f
		dd.dur[filepath.Base(path)] = f
		return nil
	})
	if err != nil {
		return nil, err
	}
	return fs, nil
}

// CutAfter makes the power go at the n-th change from now (n >= 1).
func (fs *FS) CutAfter(n int64) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	fs.cutAt = fs.ops + n
}

// Dead reports whether the power went.
func (fs *FS) Dead() bool {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	return fs.dead
}

// Ops is the number of changes so far.
func (fs *FS) Ops() int64 {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	return fs.ops
}

// FailSyncAfter makes the n-th sync from now (n >= 1) fail with EIO, once.
// As Linux does after a writeback error, the file's pages that sync was to
// write are then clean: each has reached the disk or not, and no later
// sync writes them.
func (fs *FS) FailSyncAfter(n int64) {
	fs.FailSyncAfterMode(n, Tear)
}

// FailSyncAfterMode is FailSyncAfter where mode says which of the pages
// reached the disk: none (Drop), each or not (Tear), all (Keep: the error
// was elsewhere, and the caller cannot tell).
func (fs *FS) FailSyncAfterMode(n int64, mode CutMode) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	fs.failSync = fs.syncs + n
	fs.failMode = mode
}

// FailedSyncs returns the paths of the files whose sync failed.
func (fs *FS) FailedSyncs() []string {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	return append([]string(nil), fs.failedSyncs...)
}

// NoSpaceAfter makes writes fail with ENOSPC from the n-th write from now
// (n >= 1), count of them (a full disk; count < 0: until NoSpaceAfter is
// called again). A write that fails may have written some of its pages.
func (fs *FS) NoSpaceAfter(n, count int64) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	fs.noSpaceFrom = fs.writes + n
	fs.noSpaceTo = fs.noSpaceFrom + count
	if count < 0 {
		fs.noSpaceTo = 1 << 62
	}
}

// change counts a change and reports whether it may happen. Caller holds mu.
func (fs *FS) change() error {
	fs.ops++
	if fs.cutAt > 0 && fs.ops >= fs.cutAt {
		fs.dead = true
	}
	if fs.dead {
		return syscall.EIO
	}
	return nil
}

// WriteAt writes p at off in f, as f.WriteAt does.
func (fs *FS) WriteAt(f *os.File, p []byte, off int64) (int, error) {
	if fs == nil {
		return f.WriteAt(p, off)
	}
	return fs.writeAt(f, p, off)
}

// Fdatasync makes f's data durable, as fdatasync(2) does.
func (fs *FS) Fdatasync(f *os.File) error {
	if fs == nil {
		return unix.Fdatasync(int(f.Fd()))
	}
	return fs.sync(f)
}

// Fsync makes f durable, as fsync(2) does.
func (fs *FS) Fsync(f *os.File) error {
	if fs == nil {
		return f.Sync()
	}
	return fs.sync(f)
}

// Truncate sets f's size, as f.Truncate does.
func (fs *FS) Truncate(f *os.File, size int64) error {
	if fs == nil {
		return f.Truncate(size)
	}
	return fs.truncate(f, size)
}

// Punch frees n bytes of f from off, which then read as zeros; the size
// stays (fallocate with FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE).
func (fs *FS) Punch(f *os.File, off, n int64) error {
	if fs == nil {
		return punch(f, off, n)
	}
	return fs.punch(f, off, n)
}

func punch(f *os.File, off, n int64) error {
	return unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}

// Opened tells the FS about a file the caller opened (or created) at path
// with flag: an FS must know every file it writes. On error the caller
// closes f.
func (fs *FS) Opened(path string, f *os.File, flag int) error {
	if fs == nil {
		return nil
	}
	return fs.opened(path, f, flag)
}

// Remove removes path, as os.Remove does.
func (fs *FS) Remove(path string) error {
	if fs == nil {
		return os.Remove(path)
	}
	return fs.remove(path)
}

// Rename renames oldpath to newpath in the same directory, as os.Rename.
func (fs *FS) Rename(oldpath, newpath string) error {
	if fs == nil {
		return os.Rename(oldpath, newpath)
	}
	return fs.rename(oldpath, newpath)
}

// SyncDir makes the entries of directory path durable (fsync of the
// directory).
func (fs *FS) SyncDir(path string) error {
	if fs == nil {
		d, err := os.Open(path)
		if err != nil {
			return err
		}
		defer d.Close()
		return d.Sync()
	}
	return fs.syncDir(path)
}

// ErrUntracked is returned for a change to a file the FS was not told of.
var ErrUntracked = errors.New("faultfs: file not opened through the FS")
