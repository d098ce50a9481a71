package faultfs

import (
	"fmt"
	"io"
	"maps"
	"math/rand"
	"os"
	"slices"
	"syscall"

	"golang.org/x/sys/unix"
)

// file is the model of one inode: what is durable, and every change since
// the last sync, page by page, in order.
type file struct {
	path    string // where it was last opened, for messages
	durSize int64
	dur     map[int64][]byte // page -> content; a missing page is zeros
	size    int64
	// hist holds, for each page changed since the last sync, its content
	// after each change; sizes the sizes the file had since.
	hist  map[int64][][]byte
	sizes []int64
	// clean holds pages whose content in the page cache differs from the
	// disk with no change pending: a failed sync left them so.
	clean map[int64][]byte
}

// dir is the model of a directory: its durable entries, its entries now,
// and the changes since its last sync, in order.
type dir struct {
	dur, cur map[string]*file
	pending  []nsOp
}

func (fs *FS) dirOf(path string) *dir {
	d := fs.dirs[path]
	if d == nil {
		d = &dir{dur: map[string]*file{}, cur: map[string]*file{}}
		fs.dirs[path] = d
	}
	return d
}

func keyOf(f *os.File) (fileKey, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return fileKey{}, err
	}
	return fileKey{st.Dev, st.Ino}, nil
}

// adopt takes the file at path, as it is, as durable. Caller holds mu or
// owns fs.
func (fs *FS) adopt(path string) (*file, error) {
	r, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer r.Close()
	k, err := keyOf(r)
	if err != nil {
		return nil, err
	}
	if f := fs.files[k]; f != nil {
		return f, nil
	}
	st, err := r.Stat()
	if err != nil {
		return nil, err
	}
	f := &file{path: path, durSize: st.Size(), size: st.Size(), dur: map[int64][]byte{}, hist: map[int64][][]byte{},
		clean: map[int64][]byte{}}
	// Read only the data of a sparse file: layer files are mostly holes.
	for off := int64(0); off < st.Size(); {
		data, err := unix.Seek(int(r.Fd()), off, unix.SEEK_DATA)
		if err != nil {
			break // ENXIO: no data after off
		}
		hole, err := unix.Seek(int(r.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			return nil, err
		}
		for pg := data / PageSize; pg*PageSize < hole; pg++ {
			b := make([]byte, PageSize)
			if _, err := r.ReadAt(b, pg*PageSize); err != nil && err != io.EOF {
				return nil, err
			}
			if !isZero(b) {
				f.dur[pg] = b
			}
		}
		off = hole
	}
	fs.files[k] = f
	return f, nil
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// lookup returns the model of f's inode. Caller holds mu.
func (fs *FS) lookup(f *os.File) (*file, error) {
	k, err := keyOf(f)
	if err != nil {
		return nil, err
	}
	m := fs.files[k]
	if m == nil {
		return nil, fmt.Errorf("%w: %s", ErrUntracked, f.Name())
	}
	return m, nil
}

// page returns the content of page pg now (nil: zeros).
func (m *file) page(pg int64) []byte {
	if h := m.hist[pg]; len(h) > 0 {
		return h[len(h)-1]
	}
	if b, ok := m.clean[pg]; ok {
		return b
	}
	return m.dur[pg]
}

// change records that bytes [off, off+len(p)) of the file now hold p (nil
// p: zeros, n bytes).
func (m *file) change(p []byte, off, n int64) {
	for pos := off; pos < off+n; {
		pg := pos / PageSize
		end := min(off+n, (pg+1)*PageSize)
		b := make([]byte, PageSize)
		copy(b, m.page(pg))
		if p != nil {
			copy(b[pos-pg*PageSize:end-pg*PageSize], p[pos-off:end-off])
		} else {
			clear(b[pos-pg*PageSize : end-pg*PageSize])
		}
		m.hist[pg] = append(m.hist[pg], b)
		pos = end
	}
}

func (m *file) resize(size int64) {
	if size == m.size {
		return
	}
	if size < m.size {
		// What lies past the new end reads as zeros if the file grows
		// again.
		if size%PageSize != 0 {
			m.change(nil, size, PageSize-size%PageSize)
		}
		for _, pg := range slices.Sorted(maps.Keys(m.touched())) {
			if pg*PageSize >= size && m.page(pg) != nil {
				m.hist[pg] = append(m.hist[pg], nil)
			}
		}
	}
	m.size = size
	m.sizes = append(m.sizes, size)
}

// touched returns the pages with content, durable or not.
func (m *file) touched() map[int64]bool {
	out := map[int64]bool{}
	for pg := range m.dur {
		out[pg] = true
	}
	for pg := range m.hist {
		out[pg] = true
	}
	for pg := range m.clean {
		out[pg] = true
	}
	return out
}

// synced makes every change durable.
func (m *file) synced() { m.failed(nil, Keep) }

// failed makes the changes durable after a failed writeback, as mode says
// (with rng nil: all of them, a sync that worked): for each page, its
// content after some of its changes, in order; the page cache keeps the
// last either way, and all pages are clean.
func (m *file) failed(rng *rand.Rand, mode CutMode) {
	for _, pg := range slices.Sorted(maps.Keys(m.hist)) {
		h := m.hist[pg]
		last := h[len(h)-1]
		delete(m.clean, pg)
		if rng != nil && mode != Keep {
			k := 0
			if mode == Tear {
				k = rng.Intn(len(h) + 1)
			}
			if k < len(h) {
				m.clean[pg] = last
				if k == 0 {
					continue // the disk keeps what it had
				}
				last = h[k-1]
			}
		}
		if last != nil && !isZero(last) {
			m.dur[pg] = last
		} else {
			delete(m.dur, pg)
		}
	}
	clear(m.hist)
	m.sizes = nil
	m.durSize = m.size
}

func (fs *FS) writeAt(f *os.File, p []byte, off int64) (int, error) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if err := fs.change(); err != nil {
		return 0, err
	}
	m, err := fs.lookup(f)
	if err != nil {
		return 0, err
	}
	fs.writes++
	full := p
	var noSpace error
	if fs.writes >= fs.noSpaceFrom && fs.writes < fs.noSpaceTo {
		// Some whole pages may go before the disk is full.
		p = p[:min(len(p), fs.rng.Intn(len(p)/PageSize+1)*PageSize)]
		noSpace = syscall.ENOSPC
	}
	n, err := f.WriteAt(p, off)
	m.change(full[:n], off, int64(n))
	if off+int64(n) > m.size {
		m.size = off + int64(n)
		m.sizes = append(m.sizes, m.size)
	}
	if err == nil && noSpace != nil {
		err = &os.PathError{Op: "write", Path: f.Name(), Err: noSpace}
	}
	return n, err
}

func (fs *FS) truncate(f *os.File, size int64) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if err := fs.change(); err != nil {
		return err
	}
	m, err := fs.lookup(f)
	if err != nil {
		return err
	}
	if size > m.size {
		fs.writes++
		if fs.writes >= fs.noSpaceFrom && fs.writes < fs.noSpaceTo {
			return &os.PathError{Op: "truncate", Path: f.Name(), Err: syscall.ENOSPC}
		}
	}
	if err := f.Truncate(size); err != nil {
		return err
	}
	m.resize(size)
	return nil
}

func (fs *FS) punch(f *os.File, off, n int64) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if err := fs.change(); err != nil {
		return err
	}
	m, err := fs.lookup(f)
	if err != nil {
		return err
	}
	if err := punch(f, off, n); err != nil {
		return err
	}
	m.change(nil, off, min(n, max(0, m.size-off)))
	return nil
}

func (fs *FS) sync(f *os.File) error {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	if err := fs.change(); err != nil {
		return err
	}
	m, err := fs.lookup(f)
	if err != nil {
		return err
	}
	fs.syncs++
	if fs.syncs == fs.failSync {
		// Writeback failed: each page got to the disk or did not, and all
		// are clean now.
		fs.failedSyncs = append(fs.failedSyncs, f.Name())
		m.failed(fs.rng, fs.failMode)
		return &os.PathError{Op: "fdatasync", Path: f.Name(), Err: syscall.EIO}
	}
	m.synced()
	return nil
}
