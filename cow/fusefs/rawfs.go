package fusefs

import (
	"errors"
	"io"
	"slices"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/cow/internal/blockio"
)

// mountOptions returns the go-fuse mount options. FUSE over io_uring
// (uring.go), where the kernel has it, keeps them and only changes how
// requests travel.
//
// The raw go-fuse API is used instead of the fs package: the filesystem is
// flat with a handful of files, so the fs package's inode tree buys nothing,
// and the raw API leaves the hot path (READ/WRITE) at one map lookup under a
// read lock.
//
// Why these settings (docs/DECISIONS.md, "Raw go-fuse API and the mount
// options"):
//   - CAP_ASYNC_DIO: the loop driver issues its direct I/O asynchronously;
//     without this capability FUSE turns every such request synchronous and
//     the loop worker serializes them (iodepth 1 in effect).
//   - Loop direct I/O (where the loop device is attached): loop's buffered
//     mode pushes every request through the FUSE file's page cache and a
//     synchronous FUSE request.
//   - MaxBackground: async direct I/O requests are FUSE "background"
//     requests, capped by max_background (go-fuse default 12); 128 keeps
//     deeper queues on bigger nodes from being capped.
//   - FOPEN_DIRECT_IO rather than the page cache (no faster under a
//     direct-I/O loop device): nothing (a backup reading the file, a
//     buffered loop) caches volume data a second time or sees stale pages
//     after the engine changed a volume.
//   - DisableXAttrs: go-fuse does not negotiate HANDLE_KILLPRIV, and some
//     kernels ask for security.capability before writes; ENOSYS makes the
//     kernel stop asking for the whole connection.
//   - DisableSplice (below): go-fuse otherwise tries a pipe splice for
//     every READ reply before falling back to a copy.
//   - FOPEN_PARALLEL_DIRECT_WRITES: otherwise FUSE takes the inode lock
//     exclusively for every direct write (fs/fuse/file.c).
//   - FOPEN_NOFLUSH: close(2) is no durability point (fsync is), so the
//     kernel need not send FLUSH at all.
func mountOptions(o Options) *fuse.MountOptions {
	if o.FsName == "" {
		o.FsName = "cowcsi" // mount(2) rejects an empty source
	}
	mo := &fuse.MountOptions{
		FsName:        o.FsName,
		Name:          fsType,
		MaxWrite:      maxWrite(),
		MaxReadAhead:  1 << 20,
		MaxBackground: 128,
		// The only reader is the loop device (or a test): no xattrs,
		// no ACLs, no READDIRPLUS for a directory nobody lists in a
		// hot path.
		DisableXAttrs:      true,
		DisableReadDirPlus: true,
		// Replies carry data from Go buffers (ReadResultData); trying
		// splice first only costs a pipe per READ (and fails for 1 MiB
		// replies, which exceed the default pipe size).
		DisableSplice: true,
		// All data changes come through the kernel, and sizes are
		// pushed with Resized: no automatic page-cache invalidation on
		// mtime changes.
		ExplicitDataCacheControl: true,
		ExtraCapabilities:        fuse.CAP_ASYNC_DIO,
		Debug:                    o.Debug,
	}
	if o.IOURing {
		// Only an offer: the kernel keeps the flag only when its
		// enable_uring parameter is on (Server.startRing checks).
		mo.ExtraCapabilities |= fuse.CAP_OVER_IO_URING
	}
	if o.tune != nil {
		o.tune(mo)
	}
	return mo
}

// rawFS implements fuse.RawFileSystem over a Server's nodes. Operations it
// does not override answer ENOSYS, which the kernel remembers (ACCESS,
// LSEEK, COPY_FILE_RANGE, IOCTL fall back to generic code).
type rawFS struct {
	fuse.RawFileSystem
	s *Server
}

func (r *rawFS) String() string { return "cowcsi" }

func (r *rawFS) node(ino uint64) *node {
	r.s.mu.RLock()
	n := r.s.byIno[ino]
	r.s.mu.RUnlock()
	return n
}

// errno maps an error from a BlockFile to a FUSE status.
func (r *rawFS) errno(err error) fuse.Status {
	if err == nil {
		return fuse.OK
	}
	if r.s.opts.Errno != nil {
		if e := r.s.opts.Errno(err); e != 0 {
			return safeErrno(e)
		}
	}
	var e syscall.Errno
	if errors.As(err, &e) && e != 0 {
		return safeErrno(e)
	}
	return fuse.EIO
}

// safeErrno keeps ENOSYS from reaching the kernel: FUSE takes ENOSYS as
// "operation not implemented" and stops sending it for the whole
// connection; for FSYNC that would turn every later fsync into a silent
// success.
func safeErrno(e syscall.Errno) fuse.Status {
	if e == syscall.ENOSYS {
		return fuse.EIO
	}
	return fuse.Status(e)
}

func (r *rawFS) fillAttr(n *node, a *fuse.Attr) {
	size := n.f.Size()
	mode := uint32(syscall.S_IFREG | 0o600)
	if n.readOnly {
		mode = syscall.S_IFREG | 0o400
	}
	*a = fuse.Attr{
		Ino:     n.ino,
		Size:    uint64(size),
		Blocks:  (uint64(size) + 511) / 512,
		Mode:    mode,
		Nlink:   1,
		Blksize: 4096,
	}
	setTimes(a, n.added)
}

func (r *rawFS) fillRootAttr(a *fuse.Attr) {
	*a = fuse.Attr{Ino: rootIno, Mode: syscall.S_IFDIR | 0o755, Nlink: 2, Blksize: 4096}
	setTimes(a, r.s.start)
}

func setTimes(a *fuse.Attr, t time.Time) {
	sec, nsec := uint64(t.Unix()), uint32(t.Nanosecond())
	a.Atime, a.Mtime, a.Ctime = sec, sec, sec
	a.Atimensec, a.Mtimensec, a.Ctimensec = nsec, nsec, nsec
}

func (r *rawFS) Lookup(_ <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	if h.NodeId != rootIno {
		return fuse.ENOTDIR
	}
	r.s.mu.RLock()
	n := r.s.byName[name]
	r.s.mu.RUnlock()
	if n == nil {
		return fuse.ENOENT
	}
	out.NodeId = n.ino
	out.Generation = 1
	out.SetEntryTimeout(attrTimeout)
	out.SetAttrTimeout(attrTimeout)
	r.fillAttr(n, &out.Attr)
	return fuse.OK
}

// Forget needs no bookkeeping: nodes live from Add to Remove and inode
// numbers are never reused, so a forgotten inode is simply not asked for.
func (r *rawFS) Forget(nodeid, nlookup uint64) {}

func (r *rawFS) GetAttr(_ <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	if in.NodeId == rootIno {
		r.fillRootAttr(&out.Attr)
		out.SetTimeout(attrTimeout)
		return fuse.OK
	}
	n := r.node(in.NodeId)
	if n == nil {
		return fuse.ENOENT
	}
	r.fillAttr(n, &out.Attr)
	out.SetTimeout(attrTimeout)
	return fuse.OK
}

// SetAttr accepts only what does not change the file: truncating to its
// current size (mkfs and O_TRUNC of an empty file do that) and timestamps,
// which are not stored. Sizes change through the engine, never through the
// kernel.
func (r *rawFS) SetAttr(_ <-chan struct{}, in *fuse.SetAttrIn, out *fuse.AttrOut) fuse.Status {
	if in.NodeId == rootIno {
		return fuse.EPERM
	}
	n := r.node(in.NodeId)
	if n == nil {
		return fuse.ENOENT
	}
	if size, ok := in.GetSize(); ok && int64(size) != n.f.Size() {
		return fuse.EINVAL
	}
	if in.Valid&(fuse.FATTR_MODE|fuse.FATTR_UID|fuse.FATTR_GID) != 0 {
		return fuse.EPERM
	}
	r.fillAttr(n, &out.Attr)
	out.SetTimeout(attrTimeout)
	return fuse.OK
}

func (r *rawFS) Open(_ <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	r.s.mu.Lock()
	defer r.s.mu.Unlock()
	n := r.s.byIno[in.NodeId]
	if n == nil {
		return fuse.ENOENT
	}
	if n.readOnly && in.Flags&syscall.O_ACCMODE != syscall.O_RDONLY {
		return fuse.Status(syscall.EROFS)
	}
	n.opens++
	out.Fh = n.ino
	out.OpenFlags = fuse.FOPEN_NOFLUSH | fuse.FOPEN_PARALLEL_DIRECT_WRITES
	if !r.s.opts.PageCache {
		out.OpenFlags |= fuse.FOPEN_DIRECT_IO
	}
	return fuse.OK
}

func (r *rawFS) Release(_ <-chan struct{}, in *fuse.ReleaseIn) {
	r.s.mu.Lock()
	defer r.s.mu.Unlock()
	if n := r.s.byIno[in.NodeId]; n != nil && n.opens > 0 {
		n.opens--
	}
	// Wake Remove calls waiting for the last handle.
	close(r.s.released)
	r.s.released = make(chan struct{})
}

func (r *rawFS) Read(_ <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	n := r.node(in.NodeId)
	if n == nil {
		return nil, fuse.ENOENT
	}
	got, err := n.f.ReadAt(buf[:min(int(in.Size), len(buf))], int64(in.Offset))
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, r.errno(err)
	}
	return fuse.ReadResultData(buf[:got]), fuse.OK
}

// readNoWait is Read for a ring queue's thread: wait is true, and nothing
// was read, when the file would have to wait for the disk.
func (r *rawFS) readNoWait(in *fuse.ReadIn, buf []byte) (n int, st fuse.Status, wait bool) {
	nd := r.node(in.NodeId)
	if nd == nil {
		return 0, fuse.ENOENT, false
	}
	nw, ok := nd.f.(NoWaitReader)
	if !ok {
		return 0, fuse.OK, true
	}
	got, err := nw.ReadAtNoWait(buf[:min(int(in.Size), len(buf))], int64(in.Offset))
	switch {
	case errors.Is(err, syscall.EAGAIN):
		return 0, fuse.OK, true
	case err != nil && !errors.Is(err, io.EOF):
		return 0, r.errno(err), false
	}
	return got, fuse.OK, false
}

// planRead asks the file for a read plan (ok is false if it cannot make
// one); the plan's reads go into buf.
func (r *rawFS) planRead(in *fuse.ReadIn, buf []byte) (pl *blockio.Plan, st fuse.Status, ok bool) {
	nd := r.node(in.NodeId)
	if nd == nil {
		return nil, fuse.ENOENT, true
	}
	rp, ok := nd.f.(ReadPlanner)
	if !ok {
		return nil, fuse.OK, false
	}
	pl, err := rp.PlanRead(buf[:min(int(in.Size), len(buf))], int64(in.Offset))
	switch {
	case errors.Is(err, io.EOF):
		return &blockio.Plan{Release: func() {}}, fuse.OK, true
	case errors.Is(err, syscall.EAGAIN):
		return nil, fuse.OK, false
	case err != nil:
		return nil, r.errno(err), true
	}
	return pl, fuse.OK, true
}

// planWrite asks the file for a write plan of data; ok is false if it
// cannot make one now (Write then writes it), true with a status that is
// not OK for a write that fails.
func (r *rawFS) planWrite(in *fuse.WriteIn, data []byte) (pl *blockio.Plan, st fuse.Status, ok bool) {
	n, st := r.writable(in, data)
	if st != fuse.OK {
		return nil, st, true
	}
	wp, ok := n.f.(WritePlanner)
	if !ok {
		return nil, fuse.OK, false
	}
	pl, err := wp.PlanWrite(data, int64(in.Offset))
	switch {
	case errors.Is(err, syscall.EAGAIN):
		return nil, fuse.OK, false
	case err != nil:
		return nil, r.errno(err), true
	}
	return pl, fuse.OK, pl != nil
}

func (r *rawFS) Write(_ <-chan struct{}, in *fuse.WriteIn, data []byte) (uint32, fuse.Status) {
	n, st := r.writable(in, data)
	if st != fuse.OK {
		return 0, st
	}
	written, err := n.f.WriteAt(data, int64(in.Offset))
	return uint32(written), r.errno(err)
}

// writable returns the node a WRITE of data goes to, or why it cannot.
func (r *rawFS) writable(in *fuse.WriteIn, data []byte) (*node, fuse.Status) {
	n := r.node(in.NodeId)
	if n == nil {
		return nil, fuse.ENOENT
	}
	if n.readOnly {
		return nil, fuse.EBADF
	}
	// Writes never extend the file: its size belongs to the engine.
	if int64(in.Offset)+int64(len(data)) > n.f.Size() {
		return nil, fuse.Status(syscall.EFBIG)
	}
	return n, fuse.OK
}

// Fsync is the durability point (the loop driver turns a block device flush
// into an fsync of its backing file).
func (r *rawFS) Fsync(_ <-chan struct{}, in *fuse.FsyncIn) fuse.Status {
	n := r.node(in.NodeId)
	if n == nil {
		return fuse.ENOENT
	}
	return r.errno(n.f.Flush())
}

// Flush (close(2)) is not a durability point; FOPEN_NOFLUSH keeps the kernel
// from sending it at all, this answers any that come anyway.
func (r *rawFS) Flush(_ <-chan struct{}, in *fuse.FlushIn) fuse.Status { return fuse.OK }

// Fallocate serves the two modes the loop driver uses for discard and
// write-zeroes (both with KEEP_SIZE). Allocation (mode 0) is accepted
// within the file as a no-op: blocks are allocated when written.
func (r *rawFS) Fallocate(_ <-chan struct{}, in *fuse.FallocateIn) fuse.Status {
	n := r.node(in.NodeId)
	if n == nil {
		return fuse.ENOENT
	}
	if n.readOnly {
		return fuse.EBADF
	}
	off, length := int64(in.Offset), int64(in.Length)
	size := n.f.Size()
	const keep = unix.FALLOC_FL_KEEP_SIZE
	switch in.Mode {
	case unix.FALLOC_FL_PUNCH_HOLE | keep, unix.FALLOC_FL_ZERO_RANGE | keep, unix.FALLOC_FL_ZERO_RANGE:
		if in.Mode&keep == 0 && off+length > size {
			return fuse.Status(syscall.EFBIG) // would extend the file
		}
		if off >= size {
			return fuse.OK
		}
		length = min(length, size-off)
		return r.errno(n.f.Discard(off, length))
	case 0, keep:
		if in.Mode&keep == 0 && off+length > size {
			return fuse.Status(syscall.EFBIG)
		}
		return fuse.OK
	default:
		// EOPNOTSUPP, not ENOSYS: ENOSYS would disable fallocate
		// (and with it discard) for the whole connection.
		return fuse.Status(syscall.EOPNOTSUPP)
	}
}

func (r *rawFS) OpenDir(_ <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	if in.NodeId != rootIno {
		return fuse.ENOTDIR
	}
	return fuse.OK
}

// ReadDir lists ".", ".." and the files in name order; entry i has offset
// i+1. Offsets shift when files come and go between calls, which costs at
// worst a duplicated or missed name in a listing that raced with Add/Remove.
func (r *rawFS) ReadDir(_ <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	entries := []fuse.DirEntry{
		{Name: ".", Mode: syscall.S_IFDIR, Ino: rootIno},
		{Name: "..", Mode: syscall.S_IFDIR, Ino: rootIno},
	}
	r.s.mu.RLock()
	for _, n := range r.s.byName {
		entries = append(entries, fuse.DirEntry{Name: n.name, Mode: syscall.S_IFREG, Ino: n.ino})
	}
	r.s.mu.RUnlock()
	slices.SortFunc(entries[2:], func(a, b fuse.DirEntry) int {
		switch {
		case a.Name < b.Name:
			return -1
		case a.Name > b.Name:
			return 1
		}
		return 0
	})
	for i := int(in.Offset); i < len(entries); i++ {
		e := entries[i]
		e.Off = uint64(i + 1)
		if !out.AddDirEntry(e) {
			break
		}
	}
	return fuse.OK
}

func (r *rawFS) ReleaseDir(in *fuse.ReleaseIn) {}

func (r *rawFS) StatFs(_ <-chan struct{}, _ *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	var blocks uint64
	r.s.mu.RLock()
	for _, n := range r.s.byName {
		blocks += uint64(n.f.Size()+4095) / 4096
	}
	files := uint64(len(r.s.byName))
	r.s.mu.RUnlock()
	*out = fuse.StatfsOut{Blocks: blocks, Files: files, Bsize: 4096, Frsize: 4096, NameLen: 255}
	return fuse.OK
}

// The namespace belongs to the Server (Add/Remove), not to the kernel.

func (r *rawFS) Create(<-chan struct{}, *fuse.CreateIn, string, *fuse.CreateOut) fuse.Status {
	return fuse.EPERM
}

func (r *rawFS) Tmpfile(<-chan struct{}, *fuse.CreateIn, *fuse.CreateOut) fuse.Status {
	return fuse.EPERM
}

func (r *rawFS) Mknod(<-chan struct{}, *fuse.MknodIn, string, *fuse.EntryOut) fuse.Status {
	return fuse.EPERM
}

func (r *rawFS) Mkdir(<-chan struct{}, *fuse.MkdirIn, string, *fuse.EntryOut) fuse.Status {
	return fuse.EPERM
}

func (r *rawFS) Unlink(<-chan struct{}, *fuse.InHeader, string) fuse.Status { return fuse.EPERM }

func (r *rawFS) Rmdir(<-chan struct{}, *fuse.InHeader, string) fuse.Status { return fuse.EPERM }

func (r *rawFS) Rename(<-chan struct{}, *fuse.RenameIn, string, string) fuse.Status {
	return fuse.EPERM
}

func (r *rawFS) Link(<-chan struct{}, *fuse.LinkIn, string, *fuse.EntryOut) fuse.Status {
	return fuse.EPERM
}

func (r *rawFS) Symlink(<-chan struct{}, *fuse.InHeader, string, string, *fuse.EntryOut) fuse.Status {
	return fuse.EPERM
}
