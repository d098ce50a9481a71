// Package fusefs serves a flat FUSE filesystem in which every attached
// volume is one regular file. The node plugin attaches a loop device to that
// file (cow/loopdev), so the kernel reads and writes the volume through the
// engine without nbd, ublk or device-mapper.
//
// The filesystem is deliberately small: one directory, files that the kernel
// can read, write, fsync and punch holes in, and nothing else. Files appear
// and disappear only through Server.Add and Server.Remove; sizes change only
// through the engine (Server.Resized tells the kernel).
package fusefs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/cow/internal/blockio"
)

// BlockFile is one volume as the engine exposes it.
type BlockFile interface {
	// ReadAt has io.ReaderAt semantics: io.EOF at the end of the file.
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	// Flush makes every completed write durable before it returns.
	Flush() error
	// Discard makes the range read back as zeros.
	Discard(off, length int64) error
	// Size is the current size in bytes; it may grow (online expansion).
	Size() int64
}

// NoWaitReader is implemented by BlockFiles that can tell a read that
// would wait for the disk: ReadAtNoWait fails with an error wrapping
// syscall.EAGAIN instead. Over FUSE over io_uring, reads are answered on the
// queue's own thread when they need not wait; the others go through the
// ring (ReadPlanner) or to another goroutine, so that a read from disk does
// not hold up the queue.
type NoWaitReader interface {
	ReadAtNoWait(p []byte, off int64) (int, error)
}

// ReadPlanner is implemented by BlockFiles that can hand a read over as
// reads of files (cow.Volume): over FUSE over io_uring, a read that would
// wait for the disk is then submitted to the queue's ring, so it occupies
// no thread while the disk works.
//
// PlanRead may fail with an error wrapping syscall.EAGAIN when it would
// have to wait; the read then goes to another goroutine.
type ReadPlanner interface {
	PlanRead(p []byte, off int64) (*blockio.Plan, error)
}

// WritePlanner is implemented by BlockFiles that can hand a write over as
// writes of files (cow.Volume): over FUSE over io_uring the write is then
// submitted to the queue's ring. PlanWrite returns a nil plan for a write
// it does not plan (WriteAt writes it), and an error wrapping
// syscall.EAGAIN when it would have to wait (WriteAt writes it on another
// goroutine). A write plan may hold a lock that something the file waits
// for needs until the plan's Release (cow.Volume: its write barrier, which
// a snapshot waits for): while a queue has planned writes in flight, its
// thread calls no other method of any file that may wait (ReadAtNoWait and
// PlanRead and PlanWrite must not), and answers other requests on other
// goroutines.
type WritePlanner interface {
	PlanWrite(p []byte, off int64) (*blockio.Plan, error)
}

// The engine's volumes (cow.Volume) implement NoWaitReader, ReadPlanner
// and WritePlanner; rawFS finds them by type assertion, and
// driver/export.go checks at compile time that cow.Volume still has them.

// ErrBusy is wrapped by Server.Remove when the file is still open, for
// instance by a loop device.
var ErrBusy = errors.New("file is busy")

// Options configures Mount. The zero value is usable.
type Options struct {
	// FsName is the source shown in /proc/mounts; default "cowcsi".
	FsName string
	// Errno maps an error returned by a BlockFile to the errno the kernel
	// passes on; returning 0 selects the default mapping (the wrapped
	// syscall.Errno if any, else EIO). The engine uses it for its own
	// sentinels, e.g. out of space → ENOSPC.
	Errno func(error) syscall.Errno
	// PageCache opens files without FOPEN_DIRECT_IO, so I/O through the
	// FUSE file (other than the loop device's own direct I/O) goes through
	// the page cache. Off by default: mountOptions says why.
	PageCache bool
	// IOURing serves requests through FUSE over io_uring when the kernel
	// offers it (Linux 6.14+ with the fuse module's enable_uring
	// parameter on); otherwise, or if setting the ring up fails, requests
	// go through /dev/fuse as without it. See uring.go.
	IOURing bool
	// RingEntries is the number of requests each per-CPU queue holds at
	// once; each entry has a buffer of 1 MiB (max_write), touched only as
	// far as requests fill it. The default gives 256 entries in all,
	// between 8 and 32 per queue: 32 covers an iodepth of 32 issued from
	// one CPU.
	RingEntries int
	// Debug logs every FUSE request (go-fuse's debug output).
	Debug bool
	// StatSize, if set, is how Resized asks the kernel for a file's size
	// (a stat, which the kernel answers by asking this server). The
	// default stats from this process; a server that must never wait on
	// its own connection passes one that stats from another process.
	StatSize func(path string) (int64, error)

	// tune, if set, adjusts the go-fuse mount options (benchmarks compare
	// settings with it).
	tune func(*fuse.MountOptions)
	// refuseEntry, if set, makes the kernel refuse the registration of
	// ring entry i of queue qid (tests).
	refuseEntry func(qid, i int) bool
}

const (
	rootIno = fuse.FUSE_ROOT_ID
	// attrTimeout bounds how long the kernel trusts a file's size without
	// asking again. Size changes are pushed with Resized, so this is only
	// a safety net; short enough that a missed Resized heals quickly, long
	// enough that buffered reads do not send a GETATTR each.
	attrTimeout = time.Second
	// releaseWait bounds how long Remove waits for the kernel's RELEASE
	// of the last handle: the kernel sends RELEASE asynchronously, after
	// close(2) (or a loop detach) has already returned.
	releaseWait = 2 * time.Second
)

// Server is a mounted filesystem.
type Server struct {
	dir   string
	opts  Options
	srv   *fuse.Server
	fs    *rawFS
	start time.Time
	// releaseWait is the releaseWait constant; a field so tests can
	// shorten it.
	releaseWait time.Duration

	served chan struct{} // closed when the serve loop returns

	mu       sync.RWMutex
	byName   map[string]*node
	byIno    map[uint64]*node
	nextIno  uint64
	released chan struct{} // closed and replaced whenever a handle is released

	ring     *ringServer   // nil when /dev/fuse serves everything
	ringDone chan struct{} // closed when the ring's queues have ended
	ringErr  error         // why the ring is not in use, if asked for

	unmountOnce sync.Once
	unmountErr  error
}

// node is one served file.
type node struct {
	ino      uint64
	name     string
	f        BlockFile
	readOnly bool
	added    time.Time
	opens    int // open handles; guarded by Server.mu
}

// Mount mounts an empty filesystem at dir (creating dir if needed) and serves
// it until Unmount. A stale mount left at dir by a crashed process (its
// connection aborted: ENOTCONN) is lazily unmounted first; a live mount is an
// error. ctx bounds the mount itself, not the server's lifetime.
//
// Loop devices attached to files of a crashed server cannot be carried over:
// each is bound to an open file of the dead connection and fails all I/O.
// Find them with loopdev.FindByBacking before calling Mount (once the stale
// mount is detached, the kernel no longer reports their full path).
func Mount(ctx context.Context, dir string, opts Options) (*Server, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("fusefs: %w", err)
	}
	if err := prepareMountpoint(ctx, dir); err != nil {
		return nil, err
	}
	s := &Server{
		dir:         dir,
		opts:        opts,
		start:       time.Now(),
		releaseWait: releaseWait,
		served:      make(chan struct{}),
		byName:      map[string]*node{},
		byIno:       map[uint64]*node{},
		nextIno:     rootIno + 1,
		released:    make(chan struct{}),
	}
	s.fs = &rawFS{RawFileSystem: fuse.NewDefaultRawFileSystem(), s: s}
	mo := mountOptions(opts)
	fd, err := mountFUSE(dir, mo)
	if err != nil {
		return nil, err
	}
	ringFD := -1
	if opts.IOURing {
		// The ring's own descriptor of the connection: go-fuse owns fd
		// and closes it when its serve loop ends.
		if ringFD, err = unix.Dup(fd); err != nil {
			unix.Close(fd)
			_ = unix.Unmount(dir, unix.MNT_DETACH)
			return nil, fmt.Errorf("fusefs: dup /dev/fuse: %w", err)
		}
		unix.CloseOnExec(ringFD)
	}
	// "/dev/fd/N" makes go-fuse serve the connection we mounted instead
	// of mounting itself.
	srv, err := fuse.NewServer(s.fs, "/dev/fd/"+strconv.Itoa(fd), mo)
	if err != nil {
		// go-fuse closed fd; the mount is dead: detach it.
		if ringFD >= 0 {
			unix.Close(ringFD)
		}
		_ = unix.Unmount(dir, unix.MNT_DETACH)
		return nil, fmt.Errorf("fusefs: serve %s: %w", dir, err)
	}
	s.srv = srv
	go func() {
		defer close(s.served)
		srv.Serve()
	}()
	if err := srv.WaitMount(); err != nil {
		if ringFD >= 0 {
			unix.Close(ringFD)
		}
		_ = s.Unmount()
		return nil, fmt.Errorf("fusefs: mount %s: %w", dir, err)
	}
	// The ring goes first: once INIT has offered it, the kernel holds
	// every request until all queues are registered or one registration
	// failed (then /dev/fuse serves).
	if ringFD >= 0 {
		s.startRing(ringFD)
	}
	if err := pollHack(dir); err != nil {
		_ = s.Unmount()
		return nil, err
	}
	return s, nil
}

// Dir returns the mount point.
func (s *Server) Dir() string { return s.dir }

// Path returns the path at which the file called name appears.
func (s *Server) Path(name string) string { return filepath.Join(s.dir, name) }

// Add serves f as the regular file dir/name (mode 0600, or 0400 when
// readOnly; size f.Size()). It fails wrapping fs.ErrExist if name is taken.
func (s *Server) Add(name string, f BlockFile, readOnly bool) error {
	if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") {
		return fmt.Errorf("fusefs: invalid file name %q: %w", name, fs.ErrInvalid)
	}
	s.mu.Lock()
	if _, ok := s.byName[name]; ok {
		s.mu.Unlock()
		return fmt.Errorf("fusefs: %s: %w", name, fs.ErrExist)
	}
	// Inode numbers are never reused within a mount, so a kernel that
	// still holds an old inode of a removed name cannot reach the new
	// file through it.
	n := &node{ino: s.nextIno, name: name, f: f, readOnly: readOnly, added: time.Now()}
	s.nextIno++
	s.byName[name] = n
	s.byIno[n.ino] = n
	s.mu.Unlock()
	// Drop any dentry the kernel may still have for this name (e.g. a
	// removed file whose entry has not expired). ENOENT means there was
	// none.
	s.srv.EntryNotify(rootIno, name)
	return nil
}

// Remove stops serving dir/name. It fails wrapping ErrBusy if the file is
// still open (after waiting briefly for releases the kernel has not yet
// delivered), and wrapping fs.ErrNotExist if there is no such file.
func (s *Server) Remove(name string) error {
	deadline := time.NewTimer(s.releaseWait)
	defer deadline.Stop()
	for {
		s.mu.Lock()
		n, ok := s.byName[name]
		if !ok {
			s.mu.Unlock()
			return fmt.Errorf("fusefs: %s: %w", name, fs.ErrNotExist)
		}
		if n.opens == 0 {
			delete(s.byName, name)
			delete(s.byIno, n.ino)
			s.mu.Unlock()
			// Tell the kernel the entry is gone, so that the name does
			// not resolve to the old inode from the dentry cache. ENOENT
			// means the kernel had not looked it up.
			s.srv.DeleteNotify(rootIno, n.ino, name)
			return nil
		}
		opens, released := n.opens, s.released
		s.mu.Unlock()
		select {
		case <-released:
		case <-deadline.C:
			return fmt.Errorf("fusefs: remove %s: %d open handle(s): %w", name, opens, ErrBusy)
		}
	}
}

// Resized tells the kernel that the file's size changed (f.Size() grew):
// it drops the cached attributes and fetches them again, so the new size is
// in the kernel's inode when Resized returns and a loop device's
// LOOP_SET_CAPACITY sees it. It must not be called from within a BlockFile
// method (it issues a stat on the mount).
func (s *Server) Resized(name string) error {
	s.mu.RLock()
	n, ok := s.byName[name]
	s.mu.RUnlock()
	if !ok {
		return fmt.Errorf("fusefs: %s: %w", name, fs.ErrNotExist)
	}
	want := n.f.Size()
	// A GETATTR reply that races with another attribute change is
	// discarded by the kernel, so check and retry a few times.
	var got int64
	for range 5 {
		if st := s.srv.InodeNotify(n.ino, -1, 0); !st.Ok() && st != fuse.ENOENT {
			return fmt.Errorf("fusefs: invalidate %s: %w", name, syscall.Errno(st))
		}
		var err error
		if got, err = s.statSize(s.Path(name)); err != nil {
			return fmt.Errorf("fusefs: %w", err)
		}
		if got == want {
			return nil
		}
	}
	return fmt.Errorf("fusefs: %s: kernel reports size %d, file has %d", name, got, want)
}

func (s *Server) statSize(path string) (int64, error) {
	if s.opts.StatSize != nil {
		return s.opts.StatSize(path)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

// Unmount unmounts the filesystem and stops the server. If the mount is
// busy (a loop device still holds a file), it is detached lazily: the mount
// point is freed at once, and the server keeps serving the remaining users
// until the kernel releases the last of them.
func (s *Server) Unmount() error {
	s.unmountOnce.Do(func() { s.unmountErr = s.unmount() })
	return s.unmountErr
}

func (s *Server) unmount() error {
	err := unix.Unmount(s.dir, 0)
	if errors.Is(err, unix.EBUSY) {
		err = unix.Unmount(s.dir, unix.MNT_DETACH)
		if err == nil {
			return nil // the server exits when the last user is gone
		}
	}
	if errors.Is(err, unix.EINVAL) {
		return nil // not mounted any more (unmounted from outside)
	}
	if err != nil {
		return fmt.Errorf("fusefs: unmount %s: %w", s.dir, err)
	}
	// After a plain unmount the kernel ends the connection, so the serve
	// loop ends promptly, and so do the ring's queues.
	<-s.served
	if s.ringDone != nil {
		<-s.ringDone
	}
	return nil
}
