package faultfs

import (
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
)

// Directory entries, and the power cut.

// nsOp is one change to a directory, atomic on its own (a rename is two
// entries): each name now names its file (nil: removed).
type nsOp []nsEntry

type nsEntry struct {
	name string
	f    *file
}

func (d *dir) apply(op nsOp, to map[string]*file) {
	for _, e := range op {
		if e.f == nil {
			delete(to, e.name)
		} else {
			to[e.name] = e.f
		}
	}
}

func (d *dir) do(op nsOp) {
	d.apply(op, d.cur)
	d.pending = append(d.pending, op)
}

// forget drops the inode mapping of f once no name in the directories
// names it any more: its inode number may be reused. Caller holds mu.
func (fs *FS) forget(f *file) {
	for _, d := range fs.dirs {
		for _, g := range d.cur {
			if g == f {
				return
			}
		}
	}
	for k, g := range fs.files {
		if g == f {
			delete(fs.files, k)
		}
	}
}

func (fs *FS) opened(path string, f *os.File, flag int) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	creates := flag&(os.O_CREATE|os.O_TRUNC) != 0
	if creates {
		if err := fs.change(); err != nil {
			return err
		}
	}
	k, err := keyOf(f)
	if err != nil {
		return err
	}
	m := fs.files[k]
	if strings.HasPrefix(path, "/proc/") {
		if m == nil {
			return fmt.Errorf("%w: %s", ErrUntracked, path)
		}
		return nil
	}
	path, err = filepath.Abs(path)
	if err != nil {
		return err
	}
	d, name := fs.dirOf(filepath.Dir(path)), filepath.Base(path)
	switch {
	case m == nil && flag&os.O_CREATE != 0 && d.cur[name] == nil:
		m = &file{dur: map[int64][]byte{}, hist: map[int64][][]byte{}, clean: map[int64][]byte{}}
		fs.files[k] = m
		d.do(nsOp{{name, m}})
	case m == nil:
		// Made outside the FS: take it as it is.
		if m, err = fs.adopt(path); err != nil {
			return err
		}
		d.cur[name], d.dur[name] = m, m
	}
	m.path = path
	if flag&os.O_TRUNC != 0 {
		m.resize(0)
	}
	return nil
}

func (fs *FS) remove(path string) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if err := fs.change(); err != nil {
		return err
	}
	path, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	if err := os.Remove(path); err != nil {
		return err
	}
	d, name := fs.dirOf(filepath.Dir(path)), filepath.Base(path)
	if f := d.cur[name]; f != nil {
		d.do(nsOp{{name, nil}})
		fs.forget(f)
	}
	return nil
}

func (fs *FS) rename(oldpath, newpath string) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if err := fs.change(); err != nil {
		return err
	}
	oldpath, err := filepath.Abs(oldpath)
	if err != nil {
		return err
	}
	newpath, err = filepath.Abs(newpath)
	if err != nil {
		return err
	}
	if filepath.Dir(oldpath) != filepath.Dir(newpath) {
		return fmt.Errorf("faultfs: rename across directories: %s to %s", oldpath, newpath)
	}
	if err := os.Rename(oldpath, newpath); err != nil {
		return err
	}
	d := fs.dirOf(filepath.Dir(oldpath))
	f, replaced := d.cur[filepath.Base(oldpath)], d.cur[filepath.Base(newpath)]
	if f == nil {
		return fmt.Errorf("%w: %s", ErrUntracked, oldpath)
	}
	d.do(nsOp{{filepath.Base(oldpath), nil}, {filepath.Base(newpath), f}})
	if replaced != nil {
		fs.forget(replaced)
	}
	return nil
}

func (fs *FS) syncDir(path string) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if err := fs.change(); err != nil {
		return err
	}
	path, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	d := fs.dirs[path]
	if d == nil {
		return &os.PathError{Op: "fsync", Path: path, Err: syscall.ENOENT}
	}
	d.dur = map[string]*file{}
	for name, f := range d.cur {
		d.dur[name] = f
	}
	d.pending = nil
	return nil
}

// CutMode says what of the changes not yet synced reaches the disk in a
// power cut.
type CutMode int

const (
	// Drop: none.
	Drop CutMode = iota
	// Tear: for each page, its content after some of its changes (none,
	// all, or the first few), chosen page by page, so a write may be torn
	// at page boundaries and later writes may land without earlier ones;
	// for each file, one of the sizes it had; for each directory, its
	// first few changes.
	Tear
	// Keep: all, as when only the process dies.
	Keep
)

func (m CutMode) String() string {
	return [...]string{"drop", "tear", "keep"}[m]
}

// Cut makes the power go and writes to dst, a new directory, the tree of
// root as a disk would hold it afterwards.
func (fs *FS) Cut(root, dst string, mode CutMode) error {
	return fs.cut(root, dst, mode, nil)
}

// CutPages is Cut where the test chooses: each changed page of the file at
// path reaches the disk, with its last content, if keep says so, else
// keeps what the disk had; every size and directory change is kept.
func (fs *FS) CutPages(root, dst string, keep func(path string, page int64) bool) error {
	return fs.cut(root, dst, Keep, keep)
}

func (fs *FS) cut(root, dst string, mode CutMode, keep func(string, int64) bool) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	fs.dead = true
	root, err := filepath.Abs(root)
	if err != nil {
		return err
	}
	// In sorted order, so that a seed gives the same cut.
	for _, path := range slices.Sorted(maps.Keys(fs.dirs)) {
		d := fs.dirs[path]
		rel, err := filepath.Rel(root, path)
		if err != nil || strings.HasPrefix(rel, "..") {
			continue
		}
		if err := os.MkdirAll(filepath.Join(dst, rel), 0o700); err != nil {
			return err
		}
		ents := map[string]*file{}
		for name, f := range d.dur {
			ents[name] = f
		}
		n := 0
		switch mode {
		case Tear:
			n = fs.rng.Intn(len(d.pending) + 1)
		case Keep:
			n = len(d.pending)
		}
		for _, op := range d.pending[:n] {
			d.apply(op, ents)
		}
		for _, name := range slices.Sorted(maps.Keys(ents)) {
			if err := fs.writeCut(ents[name], filepath.Join(dst, rel, name), mode, keep); err != nil {
				return err
			}
		}
	}
	return nil
}

// writeCut writes file f as the disk holds it after a cut at path.
func (fs *FS) writeCut(f *file, path string, mode CutMode, keep func(string, int64) bool) error {
	size := f.durSize
	switch {
	case mode == Keep:
		size = f.size
	case mode == Tear && len(f.sizes) > 0:
		if k := fs.rng.Intn(len(f.sizes) + 1); k > 0 {
			size = f.sizes[k-1]
		}
	}
	out, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	defer out.Close()
	for _, pg := range slices.Sorted(maps.Keys(f.touched())) {
		b := f.dur[pg]
		if h := f.hist[pg]; len(h) > 0 {
			switch {
			case keep != nil:
				if keep(f.path, pg) {
					b = h[len(h)-1]
				}
			case mode == Keep:
				b = h[len(h)-1]
			case mode == Tear:
				if k := fs.rng.Intn(len(h) + 1); k > 0 {
					b = h[k-1]
				}
			}
		}
		if b == nil || pg*PageSize >= size {
			continue
		}
		if _, err := out.WriteAt(b[:min(PageSize, size-pg*PageSize)], pg*PageSize); err != nil {
			return err
		}
	}
	return out.Truncate(size)
}
