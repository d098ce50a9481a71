package fusefs

import (
	"io"
	"sync"
	"syscall"
)

// memFile is an in-memory BlockFile: the engine's contract without the
// engine.
type memFile struct {
	mu       sync.Mutex
	data     []byte
	flushes  int
	discards int
	// err, if set, is returned by WriteAt and Flush (error mapping tests).
	err error
	// noWaits counts ReadAtNoWait calls; every other one "would block",
	// so that ring tests take both read paths.
	noWaits int
}

var (
	_ BlockFile    = (*memFile)(nil)
	_ NoWaitReader = (*memFile)(nil)
)

func (m *memFile) ReadAtNoWait(p []byte, off int64) (int, error) {
	m.mu.Lock()
	m.noWaits++
	wait := m.noWaits%2 == 1
	m.mu.Unlock()
	if wait {
		return 0, syscall.EAGAIN
	}
	return m.ReadAt(p, off)
}

func newMemFile(size int) *memFile { return &memFile{data: make([]byte, size)} }

func (m *memFile) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off >= int64(len(m.data)) {
		return 0, io.EOF
	}
	n := copy(p, m.data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (m *memFile) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.err != nil {
		return 0, m.err
	}
	if off+int64(len(p)) > int64(len(m.data)) {
		return 0, io.ErrShortWrite
	}
	return copy(m.data[off:], p), nil
}

func (m *memFile) Flush() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.flushes++
	return m.err
}

func (m *memFile) Discard(off, length int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.discards++
	clear(m.data[off : off+length])
	return nil
}

func (m *memFile) Size() int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return int64(len(m.data))
}

// grow extends the file, as online expansion does.
func (m *memFile) grow(size int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.data = append(m.data, make([]byte, size-len(m.data))...)
}

func (m *memFile) counts() (flushes, discards int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.flushes, m.discards
}

func (m *memFile) bytes(off, n int) []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]byte(nil), m.data[off:off+n]...)
}

func (m *memFile) setErr(err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.err = err
}
