//go:build linux

// Package uring is a minimal raw io_uring binding: one ring with 128-byte
// SQEs and 32-byte CQEs (IORING_SETUP_SQE128|IORING_SETUP_CQE32), which is
// what IORING_OP_URING_CMD on /dev/fuse needs, plus plain reads and writes.
// It does no buffer management and keeps no per-request state.
//
// # Goroutines and threads
//
// A Ring is not safe for concurrent use; one goroutine owns it. The kernel
// tracks the submitting *thread*, not the goroutine, and Go moves goroutines
// between threads, so:
//
//   - Without SetupSingleIssuer/SetupDeferTaskrun any thread may submit; the
//     only requirement is that calls are not concurrent.
//   - With SetupSingleIssuer the thread that called New is the only one the
//     kernel accepts submissions from (others get EEXIST). Call
//     runtime.LockOSThread before New and use the Ring only from that
//     goroutine until after Close. SetupDeferTaskrun additionally requires
//     that thread to be the one that waits for completions.
//   - Do not let a goroutine that is locked to the submitting thread exit
//     while still locked: Go then kills the thread, and the kernel cancels
//     the requests that thread issued.
//
// # Buffers
//
// The caller owns every buffer an SQE refers to. The kernel may read or
// write it at any time until the matching CQE is reaped, so it must stay
// referenced (the Ring does not retain it) and must not live on a goroutine
// stack. Mmapped memory or long-lived heap slices are the intended use.
package uring

import (
	"errors"
	"fmt"
	"runtime"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// SetupFlags are io_uring_setup(2) flags a caller may add. SQE128 and CQE32
// are always set and are not exposed.
type SetupFlags uint32

const (
	// SetupSingleIssuer promises one submitting thread; see the package doc.
	SetupSingleIssuer SetupFlags = 1 << 12
	// SetupDeferTaskrun runs completion work only when the submitter waits
	// (SubmitAndWait, WaitCQE). Requires SetupSingleIssuer.
	SetupDeferTaskrun SetupFlags = 1 << 13

	// setupTaskrunFlag makes the kernel raise a flag in the SQ ring when
	// deferred completion work is pending; PeekCQE and ForEachCQE then
	// enter the kernel to run it. Needs SetupDeferTaskrun (tests).
	setupTaskrunFlag SetupFlags = 1 << 9

	setupSQE128 = 1 << 10
	setupCQE32  = 1 << 11

	// Everything else (SQPOLL, IOPOLL, NO_MMAP, NO_SQARRAY, ...) changes how
	// the rings must be driven or mapped, which this package does not do.
	allowedSetup = SetupSingleIssuer | SetupDeferTaskrun | setupTaskrunFlag
)

// Feature bits reported by io_uring_setup (IORING_FEAT_*).
const (
	featSingleMMap uint32 = 1 << 0
	featNoDrop     uint32 = 1 << 1
)

const (
	offSQRing = 0
	offCQRing = 0x8000000
	offSQEs   = 0x10000000

	enterGetEvents = 1 << 0

	sqCQOverflow = 1 << 1
	sqTaskrun    = 1 << 2
)

// errClosed is returned by operations on a closed Ring.
var errClosed = errors.New("uring: ring closed")

// CQE is one 32-byte completion queue entry (struct io_uring_cqe under
// IORING_SETUP_CQE32). It is returned by value because the ring slot is
// reused by the kernel as soon as the head moves past it.
type CQE struct {
	UserData uint64    // @0, from the SQE
	Res      int32     // @8, result or -errno
	Flags    uint32    // @12, IORING_CQE_F_* bits
	BigCQE   [2]uint64 // @16, extra data some URING_CMD drivers return
}

// struct io_sqring_offsets / io_cqring_offsets / io_uring_params.
type sqringOffsets struct {
	head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
	userAddr                                                        uint64
}

type cqringOffsets struct {
	head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
	userAddr                                                        uint64
}

type params struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFd uint32
	resv                                                                   [3]uint32
	sqOff                                                                  sqringOffsets
	cqOff                                                                  cqringOffsets
}

// Ring is one io_uring instance. See the package documentation for the
// threading and buffer-ownership rules.
type Ring struct {
	open     bool
	fd       int
	flags    uint32
	features uint32

	sqRing []byte
	cqRing []byte // same mapping as sqRing under featSingleMMap
	sqeMem []byte

	// Pointers into the shared rings. Kernel-written fields are only read
	// with atomic loads (acquire), ours only written with atomic stores
	// (release), so that SQE contents are visible before the tail that
	// publishes them and CQE contents are read before the head that frees
	// their slot.
	sqHead  *uint32 // kernel writes
	sqTail  *uint32 // we write
	sqFlags *uint32 // kernel writes
	sqMask  uint32
	sqLen   uint32
	sqes    []SQE
	// sqeTail is the next slot GetSQE hands out. It runs ahead of *sqTail
	// until the next submit publishes it.
	sqeTail uint32

	cqHead *uint32 // we write
	cqTail *uint32 // kernel writes
	cqMask uint32
	cqLen  uint32
	cqes   []CQE
	// cqHeadLocal mirrors *cqHead; only this side writes it, so there is no
	// need to read it back from shared memory.
	cqHeadLocal uint32
}

// New creates a ring with at least entries SQEs (rounded up to a power of
// two by the kernel) and a CQ twice that size. The error wraps the errno, so
// errors.Is(err, unix.ENOSYS) / unix.EPERM detect a kernel without io_uring
// or with it disabled by sysctl.
func New(entries uint32, flags SetupFlags) (*Ring, error) {
	if flags&^allowedSetup != 0 {
		return nil, fmt.Errorf("uring: unsupported setup flags %#x: %w", uint32(flags&^allowedSetup), unix.EINVAL)
	}
	p := params{flags: uint32(flags) | setupSQE128 | setupCQE32}
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(&p)), 0)
	if errno != 0 {
		return nil, fmt.Errorf("io_uring_setup: %w", errno)
	}
	r := &Ring{open: true, fd: int(fd), flags: p.flags, features: p.features}
	if err := r.mapRings(&p); err != nil {
		_ = r.Close()
		return nil, err
	}
	return r, nil
}

func (r *Ring) mapRings(p *params) error {
	const prot = unix.PROT_READ | unix.PROT_WRITE
	const mflags = unix.MAP_SHARED | unix.MAP_POPULATE

	sqSize := int(p.sqOff.array) + int(p.sqEntries)*4
	cqSize := int(p.cqOff.cqes) + int(p.cqEntries)*int(unsafe.Sizeof(CQE{}))
	single := p.features&featSingleMMap != 0
	if single {
		// One mapping backs both rings, so it must cover the larger.
		sqSize = max(sqSize, cqSize)
	}
	var err error
	if r.sqRing, err = unix.Mmap(r.fd, offSQRing, sqSize, prot, mflags); err != nil {
		return fmt.Errorf("mmap SQ ring: %w", err)
	}
	if single {
		r.cqRing = r.sqRing
	} else if r.cqRing, err = unix.Mmap(r.fd, offCQRing, cqSize, prot, mflags); err != nil {
		return fmt.Errorf("mmap CQ ring: %w", err)
	}
	sqeBytes := int(p.sqEntries) * int(unsafe.Sizeof(SQE{}))
	if r.sqeMem, err = unix.Mmap(r.fd, offSQEs, sqeBytes, prot, mflags); err != nil {
		return fmt.Errorf("mmap SQEs: %w", err)
	}

	r.sqHead = ringU32(r.sqRing, p.sqOff.head)
	r.sqTail = ringU32(r.sqRing, p.sqOff.tail)
	r.sqFlags = ringU32(r.sqRing, p.sqOff.flags)
	r.sqMask = *ringU32(r.sqRing, p.sqOff.ringMask)
	r.sqLen = *ringU32(r.sqRing, p.sqOff.ringEntries)
	r.sqes = unsafe.Slice((*SQE)(unsafe.Pointer(&r.sqeMem[0])), p.sqEntries)
	r.sqeTail = atomic.LoadUint32(r.sqTail)

	// SQE slot i is always used for ring position i&mask, so the
	// indirection array is the identity and is written once.
	array := unsafe.Slice(ringU32(r.sqRing, p.sqOff.array), p.sqEntries)
	for i := range array {
		array[i] = uint32(i)
	}

	r.cqHead = ringU32(r.cqRing, p.cqOff.head)
	r.cqTail = ringU32(r.cqRing, p.cqOff.tail)
	r.cqMask = *ringU32(r.cqRing, p.cqOff.ringMask)
	r.cqLen = *ringU32(r.cqRing, p.cqOff.ringEntries)
	r.cqes = unsafe.Slice((*CQE)(unsafe.Pointer(&r.cqRing[p.cqOff.cqes])), p.cqEntries)
	r.cqHeadLocal = atomic.LoadUint32(r.cqHead)
	return nil
}

func ringU32(mem []byte, off uint32) *uint32 {
	// Slicing checks that all four bytes lie inside the mapping.
	return (*uint32)(unsafe.Pointer(&mem[off : off+4][0]))
}

// GetSQE returns a zeroed free submission slot, or nil if all slots are
// queued but not yet consumed by the kernel (submit, then retry) or the ring
// is closed. The slot is queued for the next submit as soon as it is
// returned; an SQE that is not wanted after all must still be filled, e.g.
// with PrepNop.
func (r *Ring) GetSQE() *SQE {
	if !r.open {
		return nil
	}
	if r.sqeTail-atomic.LoadUint32(r.sqHead) >= r.sqLen {
		return nil
	}
	s := &r.sqes[r.sqeTail&r.sqMask]
	r.sqeTail++
	*s = SQE{}
	return s
}

// sqReady is the number of SQEs obtained from GetSQE and not yet consumed
// by the kernel.
func (r *Ring) sqReady() uint32 {
	if !r.open {
		return 0
	}
	return r.sqeTail - atomic.LoadUint32(r.sqHead)
}

// flushSQ publishes queued SQEs to the kernel and returns how many it has
// not consumed yet.
func (r *Ring) flushSQ() uint32 {
	atomic.StoreUint32(r.sqTail, r.sqeTail)
	return r.sqeTail - atomic.LoadUint32(r.sqHead)
}

// enter wraps io_uring_enter(2). A signal can interrupt it only before
// anything was submitted (otherwise the kernel returns the count), so
// retrying EINTR with the same arguments cannot double-submit.
func (r *Ring) enter(toSubmit, minComplete, flags uint32) (int, error) {
	for {
		n, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd),
			uintptr(toSubmit), uintptr(minComplete), uintptr(flags), 0, 0)
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return 0, errno
		}
		return int(n), nil
	}
}

// Submit hands all queued SQEs to the kernel without waiting and returns how
// many it consumed. The kernel can stop early (resource shortage, or a
// failed SQE); the rest stay queued for the next call.
func (r *Ring) Submit() (int, error) {
	if !r.open {
		return 0, errClosed
	}
	n := r.flushSQ()
	if n == 0 {
		return 0, nil
	}
	return r.enter(n, 0, 0)
}

// SubmitAndWait submits all queued SQEs and waits until at least waitNr
// CQEs are in the completion ring (counting ones already there and not yet
// reaped), then returns how many SQEs were consumed. waitNr is capped at the
// CQ size, which is all the kernel can ever report at once.
func (r *Ring) SubmitAndWait(waitNr uint32) (int, error) {
	if !r.open {
		return 0, errClosed
	}
	if waitNr == 0 {
		return r.Submit()
	}
	waitNr = min(waitNr, r.cqLen)
	total := 0
	for {
		n, err := r.enter(r.flushSQ(), waitNr, enterGetEvents)
		total += n
		if err != nil {
			return total, err
		}
		// The kernel skips the wait when it submitted only part of the
		// batch, and a signal after a successful submit ends the wait early
		// without an error; in both cases go round again.
		if r.cqReady() >= waitNr {
			return total, nil
		}
	}
}

// cqReady is the number of CQEs in the ring not yet reaped. It does not
// enter the kernel, so with SetupDeferTaskrun completions whose task work
// has not run yet are not counted.
func (r *Ring) cqReady() uint32 {
	return atomic.LoadUint32(r.cqTail) - r.cqHeadLocal
}

// cqTailFlushed loads the CQ tail. If the ring is empty but the kernel has
// flagged overflowed CQEs or pending task work (setupTaskrunFlag), it enters
// the kernel once to get them posted; without that a poller would never see
// them.
func (r *Ring) cqTailFlushed() uint32 {
	tail := atomic.LoadUint32(r.cqTail)
	if tail != r.cqHeadLocal || atomic.LoadUint32(r.sqFlags)&(sqCQOverflow|sqTaskrun) == 0 {
		return tail
	}
	// Errors (e.g. EEXIST from the wrong thread under SetupDeferTaskrun)
	// leave the ring as it was; the caller just sees no CQE.
	_, _ = r.enter(0, 0, enterGetEvents)
	return atomic.LoadUint32(r.cqTail)
}

// PeekCQE returns the oldest unreaped CQE without consuming it; call
// SeenCQE to release it. It does not wait; under SetupDeferTaskrun without
// SetupTaskrunFlag it cannot see completions until something waits
// (SubmitAndWait, WaitCQE).
func (r *Ring) PeekCQE() (CQE, bool) {
	if !r.open {
		return CQE{}, false
	}
	if r.cqTailFlushed() == r.cqHeadLocal {
		return CQE{}, false
	}
	return r.cqes[r.cqHeadLocal&r.cqMask], true
}

// SeenCQE consumes the CQE last returned by PeekCQE or WaitCQE, letting the
// kernel reuse its slot.
func (r *Ring) SeenCQE() {
	if !r.open || atomic.LoadUint32(r.cqTail) == r.cqHeadLocal {
		return
	}
	r.cqHeadLocal++
	atomic.StoreUint32(r.cqHead, r.cqHeadLocal)
}

// ForEachCQE calls fn for every CQE currently in the ring, oldest first,
// then consumes them all with one head update, and returns how many there
// were. fn may queue and submit new SQEs but must not reap CQEs itself.
func (r *Ring) ForEachCQE(fn func(CQE)) int {
	if !r.open {
		return 0
	}
	head, tail := r.cqHeadLocal, r.cqTailFlushed()
	for h := head; h != tail; h++ {
		fn(r.cqes[h&r.cqMask])
	}
	if tail != head {
		r.cqHeadLocal = tail
		atomic.StoreUint32(r.cqHead, tail)
	}
	return int(tail - head)
}

// WaitCQE returns the oldest unreaped CQE, blocking until one arrives. It
// does not consume it; call SeenCQE. Queued SQEs are submitted first, since
// waiting on a completion that was never submitted would block forever.
func (r *Ring) WaitCQE() (CQE, error) {
	for {
		if !r.open {
			return CQE{}, errClosed
		}
		if c, ok := r.PeekCQE(); ok {
			return c, nil
		}
		if _, err := r.enter(r.flushSQ(), 1, enterGetEvents); err != nil {
			return CQE{}, err
		}
	}
}

// Close unmaps the rings and closes the ring fd; further calls do nothing.
// The kernel cancels requests still in flight asynchronously, so buffers
// they refer to may still be accessed for a moment after Close returns:
// reap everything (or cancel and reap) first if those buffers will be
// reused.
func (r *Ring) Close() error {
	if !r.open {
		return nil
	}
	r.open = false
	var errs []error
	unmap := func(b []byte) {
		if b != nil {
			if err := unix.Munmap(b); err != nil {
				errs = append(errs, err)
			}
		}
	}
	unmap(r.sqeMem)
	if r.cqRing != nil && (r.sqRing == nil || &r.cqRing[0] != &r.sqRing[0]) {
		unmap(r.cqRing)
	}
	unmap(r.sqRing)
	if err := unix.Close(r.fd); err != nil {
		errs = append(errs, err)
	}
	*r = Ring{fd: -1}
	return errors.Join(errs...)
}

// IORING_REGISTER_BUFFERS2 and IORING_REGISTER_BUFFERS_UPDATE, and the
// flag that makes a registration sparse (every slot empty).
const (
	registerBuffers2      = 15
	registerBuffersUpdate = 16
	rsrcRegisterSparse    = 1 << 0
)

// RegisterSparseBuffers registers n empty fixed-buffer slots, to be filled
// one at a time with UpdateBuffer: a caller that would pin much memory it
// may never use registers a buffer only once it is worth pinning.
func (r *Ring) RegisterSparseBuffers(n uint32) error {
	if !r.open {
		return errClosed
	}
	// struct io_uring_rsrc_register: nr u32, flags u32, resv2 u64,
	// data u64, tags u64.
	var reg struct {
		nr, flags  uint32
		resv2      uint64
		data, tags uint64
	}
	reg.nr, reg.flags = n, rsrcRegisterSparse
	_, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(r.fd), registerBuffers2,
		uintptr(unsafe.Pointer(&reg)), unsafe.Sizeof(reg), 0, 0)
	if errno != 0 {
		return errno
	}
	return nil
}

// UpdateBuffer registers buf as the fixed buffer at index, replacing what
// was there (RegisterSparseBuffers). The kernel pins buf's pages until
// the slot is replaced or the ring is closed, so buf must be memory that
// stays mapped as long as that (mmapped memory, not the Go heap, whose
// pages the garbage collector may reuse for other objects).
func (r *Ring) UpdateBuffer(index uint32, buf []byte) error {
	if !r.open {
		return errClosed
	}
	if len(buf) == 0 {
		return errors.New("uring: empty buffer")
	}
	iov := unix.Iovec{Base: &buf[0]}
	iov.SetLen(len(buf))
	// struct io_uring_rsrc_update2: offset u32, resv u32, data u64,
	// tags u64, nr u32, resv2 u32.
	var up struct {
		offset, resv uint32
		data, tags   uint64
		nr, resv2    uint32
	}
	up.offset, up.data, up.nr = index, uint64(uintptr(unsafe.Pointer(&iov))), 1
	n, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(r.fd), registerBuffersUpdate,
		uintptr(unsafe.Pointer(&up)), unsafe.Sizeof(up), 0, 0)
	runtime.KeepAlive(&iov)
	if errno != 0 {
		return errno
	}
	if n != 1 {
		return fmt.Errorf("uring: buffer update took %d of 1", n)
	}
	return nil
}
