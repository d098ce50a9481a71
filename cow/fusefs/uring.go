package fusefs

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/cow/fusefs/internal/uring"
	"github.com/cowcsi/cowcsi/cow/internal/blockio"
)

// FUSE over io_uring (Linux 6.14+, include/uapi/linux/fuse.h).
//
// Why: on a /dev/fuse connection every request costs the server a read(2)
// and a writev(2), each a wakeup of a thread blocked in the kernel. Over
// io_uring the server registers buffers ("ring entries") per CPU queue; the
// kernel copies a request into an entry of the queue of the CPU that issued
// it and completes that entry's command. The server answers by committing
// the entry, which also fetches the next request, and it commits every
// entry it has answered and waits for the next requests in one
// io_uring_enter(2). READ replies and WRITE data sit in the entry's payload
// buffer, which the engine reads into and writes from directly.
//
// go-fuse (v2.12.1) only negotiates the capability; the ring side is here.
// go-fuse still serves the /dev/fuse side: INIT, requests sent before every
// queue is registered, FORGET and INTERRUPT, and it writes notifications.
// docs/BENCHMARKS.md has the measurements.
const (
	uringCmdRegister       = 1 // FUSE_IO_URING_CMD_REGISTER
	uringCmdCommitAndFetch = 2 // FUSE_IO_URING_CMD_COMMIT_AND_FETCH

	// struct fuse_uring_req_header: in_out (fuse_in_header of a request,
	// fuse_out_header of a reply), op_in (the request's first argument),
	// ring_ent_in_out.
	ringInOutSize = 128
	ringOpInOff   = ringInOutSize
	ringOpInSize  = 128
	ringEntOff    = ringOpInOff + ringOpInSize
	// struct fuse_uring_ent_in_out: flags u64, commit_id u64,
	// payload_sz u32, padding u32, reserved u64.
	ringEntCommitOff  = ringEntOff + 8
	ringEntPayloadOff = ringEntOff + 16
	ringHeaderSize    = ringEntOff + 32

	inHeaderSize  = int(unsafe.Sizeof(fuse.InHeader{}))
	outHeaderSize = int(unsafe.Sizeof(fuse.OutHeader{}))

	// user_data of the eventfd read that wakes a queue for completions of
	// requests answered off the ring thread.
	wakeTag = 1 << 63
	// user_data of a read or write of a layer file (a plan's segment):
	// ioTag | entry<<segBits | seg.
	ioTag   = 1 << 62
	segBits = 24
)

// FUSE opcodes the ring serves (include/uapi/linux/fuse.h).
const (
	opLookup     = 1
	opGetattr    = 3
	opSetattr    = 4
	opOpen       = 14
	opRead       = 15
	opWrite      = 16
	opStatfs     = 17
	opRelease    = 18
	opFsync      = 20
	opFlush      = 25
	opOpendir    = 27
	opReaddir    = 28
	opReleasedir = 29
	opPoll       = 40
	opFallocate  = 43

	// The namespace belongs to the Server: what rawFS answers EPERM.
	opSymlink = 6
	opMknod   = 8
	opMkdir   = 9
	opUnlink  = 10
	opRmdir   = 11
	opRename  = 12
	opLink    = 13
	opCreate  = 35
	opRename2 = 45
	opTmpfile = 51
)

const uringParam = "/sys/module/fuse/parameters/enable_uring"

// uringEnabled reports whether the kernel offers FUSE over io_uring to new
// connections (the fuse module's enable_uring parameter, off by default).
func uringEnabled() bool {
	b, err := os.ReadFile(uringParam)
	return err == nil && len(b) > 0 && (b[0] == 'Y' || b[0] == '1')
}

// IOURingSupported reports whether the kernel has FUSE over io_uring (the
// fuse module's enable_uring parameter exists, on or off).
func IOURingSupported() bool {
	_, err := os.Stat(uringParam)
	return err == nil
}

// EnableIOURing turns on the fuse module's enable_uring parameter (root),
// so that the kernel offers FUSE over io_uring to new connections. Only
// connections whose server asks for it (Options.IOURing) use it; others
// are unaffected. It fails on kernels without FUSE over io_uring.
func EnableIOURing() error {
	if uringEnabled() {
		return nil
	}
	if !IOURingSupported() {
		return errors.New("fusefs: kernel without FUSE over io_uring (Linux 6.14+, CONFIG_FUSE_IO_URING)")
	}
	if err := os.WriteFile(uringParam, []byte("Y"), 0o644); err != nil {
		return fmt.Errorf("fusefs: turn on FUSE over io_uring: %w", err)
	}
	return nil
}

// ringServer serves a connection's requests through one io_uring queue per
// possible CPU (the kernel queues a request on the queue of the CPU that
// sent it and uses the ring only once every queue has an entry).
type ringServer struct {
	rfs    *rawFS
	fd     int // our own descriptor of the connection (a dup)
	queues []*ringQueue
	done   sync.WaitGroup // queue threads
	// workers answer requests off the ring threads; entry buffers and
	// eventfds stay until they are done.
	workers sync.WaitGroup
	// onExit, if set, is called when a queue ends with an error while
	// the connection may still be up: that CPU's requests would wait for
	// it forever.
	onExit func(qid int, err error)
	// refuseEntry: Options.refuseEntry. badCommit makes the next commit
	// name a request the kernel does not know (tests).
	refuseEntry func(qid, i int) bool
	badCommit   atomic.Bool
	// requests counts the requests answered through the ring; polls the
	// FUSE_POLL requests among them (tests: pollHack must reach the ring).
	requests atomic.Uint64
	polls    atomic.Uint64
	// fixedIO counts file reads and writes submitted from a fixed buffer.
	fixedIO atomic.Uint64
}

// ringQueue is one queue: a ring owned by one locked OS thread.
type ringQueue struct {
	rs      *ringServer
	qid     int
	entries []ringEnt
	ring    *uring.Ring
	mem     []byte // headers and payloads of all entries (mmap)
	efd     int    // eventfd: completions from other goroutines, stop
	efdBuf  []byte // the eventfd read's target (in mem: not moved by GC)
	stop    atomic.Bool

	// live is the number of entries registered and not yet ended.
	live int
	// failed is set when the ring itself fails (no SQE can be had):
	// an answer that cannot be committed strands its request.
	failed error

	// writing is the number of entries whose planned writes are in
	// flight (WritePlanner); while it is not 0 the thread must not wait
	// for anything a file's method may wait for (see handle).
	writing int

	mu       sync.Mutex
	finished []int // entries answered off the ring thread, to commit
}

// ringEnt is one registered entry.
type ringEnt struct {
	hdr []byte // ringHeaderSize bytes
	pay []byte
	iov [2]unix.Iovec // what REGISTER points at; lives as long as the queue

	// A READ answered from files through the ring: the plan, its reads
	// still in flight, and the status so far.
	plan    *blockio.Plan
	pending int
	status  fuse.Status

	// fixed: the payload is registered as the ring's fixed buffer of
	// the entry's index (1), cannot be (-1: the ring has no slots, or
	// the registration failed), or not yet (0).
	fixed int8
}

// fixedMin is the smallest file read or write that uses the entry's
// payload as a fixed buffer. A direct read or write pins its buffer's
// pages for each request (in a profile of the 1 MiB rows, the kernel's
// gup_fast_fallback took about 7% of the machine's time); a fixed buffer
// was pinned once, when registered. Registering pins all of the payload
// (maxWrite), so only entries that carry large requests, whose payload
// is then mostly in memory anyway, are registered.
const fixedMin = 256 << 10

// fixedBuf reports whether buf, a file read's or write's buffer for entry
// i, is in the entry's payload and that payload is registered as fixed
// buffer i, registering it on its first large request.
func (q *ringQueue) fixedBuf(i int, buf []byte) bool {
	e := &q.entries[i]
	if len(buf) < fixedMin || e.fixed < 0 {
		return false
	}
	p0 := uintptr(unsafe.Pointer(unsafe.SliceData(e.pay)))
	b0 := uintptr(unsafe.Pointer(unsafe.SliceData(buf)))
	if b0 < p0 || b0+uintptr(len(buf)) > p0+uintptr(len(e.pay)) {
		return false
	}
	if e.fixed == 0 {
		e.fixed = -1
		if err := q.ring.UpdateBuffer(uint32(i), e.pay); err == nil {
			e.fixed = 1
		}
	}
	return e.fixed > 0
}

// start registers entries ring entries on each of nq queues (the number of
// possible CPUs) of the connection whose /dev/fuse descriptor is rs.fd (the
// ring server owns and closes it). It returns once every queue has
// submitted its registrations; an error means none of the ring is in use
// and the /dev/fuse side serves everything.
//
// The kernel uses the ring for good once every queue has an entry, even if
// other registrations were refused (a refusal only stops requests from
// waiting for the ring). So a queue that kept some entries serves with
// them; only a queue left with none fails, and then the ring never became
// ready and /dev/fuse serves.
func (rs *ringServer) start(nq, entries, payload int) error {
	fd := rs.fd
	started := make(chan error, nq)
	for qid := range nq {
		q := &ringQueue{rs: rs, qid: qid}
		rs.queues = append(rs.queues, q)
		rs.done.Add(1)
		go q.run(entries, payload, started)
	}
	var first error
	for range nq {
		if err := <-started; err != nil && first == nil {
			first = err
		}
	}
	if first != nil {
		// Requests wait until every queue has an entry or a
		// registration failed: make one fail, so that /dev/fuse serves
		// them, then drop the queues that did register.
		if err := refuseRing(fd); err != nil {
			first = fmt.Errorf("%w; and falling back to /dev/fuse: %v", first, err)
		}
		rs.stop()
		return first
	}
	reserveProcs(nq)
	return nil
}

// reserveProcs raises GOMAXPROCS, once per process, by the number of ring
// queues, unless the GOMAXPROCS environment variable set it. A queue's
// thread spends most of its time blocked in io_uring_enter, and a
// goroutine blocked in a syscall keeps its P until sysmon takes it back
// (from 20 µs, and sysmon sleeps longer when idle): with one P per CPU,
// two busy queues on two CPUs left the rest of the process (the engine's
// goroutines, go-fuse's /dev/fuse readers, the garbage collector) waiting
// for sysmon. With a spare P per queue, 4 KiB reads at chain depth 64 ran
// at 0.92 of depth 1 on average over five bench-io runs against 0.83
// without (docs/BENCHMARKS.md, "What was tried"). Setting GOMAXPROCS
// also stops the runtime from following a later change of the container's
// CPU limit (Go 1.25+).
func reserveProcs(queues int) {
	procsOnce.Do(func() {
		if os.Getenv("GOMAXPROCS") != "" {
			return
		}
		runtime.GOMAXPROCS(runtime.GOMAXPROCS(0) + queues)
	})
}

var procsOnce sync.Once

// refuseRing sends a registration the kernel must refuse (a queue that
// does not exist); a refused registration turns the ring off for the
// connection and releases the requests waiting for it.
func refuseRing(fd int) error {
	ring, err := uring.New(1, 0)
	if err != nil {
		return err
	}
	defer ring.Close()
	// On the heap: the kernel reads the iovecs by address.
	hdr, pay := make([]byte, ringHeaderSize), make([]byte, 4096)
	iov := &[2]unix.Iovec{{Base: &hdr[0], Len: uint64(len(hdr))}, {Base: &pay[0], Len: uint64(len(pay))}}
	sqe := ring.GetSQE()
	sqe.PrepURingCmd(int32(fd), uringCmdRegister, uint64(uintptr(unsafe.Pointer(&iov[0]))), 2, 0)
	cmd := sqe.Cmd()
	binary.LittleEndian.PutUint16(cmd[16:], 0xffff)
	c, err := ring.WaitCQE()
	runtime.KeepAlive(iov)
	runtime.KeepAlive(hdr)
	runtime.KeepAlive(pay)
	if err != nil {
		return err
	}
	if c.Res >= 0 {
		return errors.New("registration of queue 65535 was accepted")
	}
	return nil
}

// stop ends every queue and waits for them. The kernel keeps requests that
// would have gone to the ring queued; only call it when the connection is
// gone or about to go.
func (rs *ringServer) stop() {
	for _, q := range rs.queues {
		q.wake(true)
	}
	rs.wait()
}

// wait waits for every queue to end (on its own when the connection ended)
// and releases what they used.
func (rs *ringServer) wait() {
	rs.done.Wait()
	rs.workers.Wait()
	for _, q := range rs.queues {
		if q.mem != nil {
			_ = unix.Munmap(q.mem)
		}
		if q.efd > 0 {
			unix.Close(q.efd)
		}
	}
	unix.Close(rs.fd)
}

func (q *ringQueue) wake(stop bool) {
	if stop {
		q.stop.Store(true)
	}
	if q.efd <= 0 {
		return
	}
	var one [8]byte
	binary.LittleEndian.PutUint64(one[:], 1)
	_, _ = unix.Write(q.efd, one[:])
}

// run is the queue's thread: register, then answer and commit until the
// connection ends or stop.
func (q *ringQueue) run(entries, payload int, started chan<- error) {
	defer q.rs.done.Done()
	// The ring is single-issuer with deferred task work: the kernel runs
	// completions only in io_uring_enter of the thread that set it up.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	err := q.setup(entries, payload)
	started <- err
	if err != nil {
		q.teardown()
		return
	}
	err = q.serve()
	q.teardown()
	if err != nil && q.rs.onExit != nil {
		q.rs.onExit(q.qid, err)
	}
}

func (q *ringQueue) setup(entries, payload int) error {
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return fmt.Errorf("fusefs: eventfd: %w", err)
	}
	q.efd = efd
	// Pin the thread to its queue's CPU, as the kernel expects requests
	// of a CPU to be answered there (cache-hot, no cross-CPU wakeup).
	var set unix.CPUSet
	set.Set(q.qid)
	_ = unix.SchedSetaffinity(0, &set)

	payload = (payload + 4095) &^ 4095
	per := 4096 + payload // header page, payload
	mem, err := unix.Mmap(-1, 0, entries*per+4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return fmt.Errorf("fusefs: ring buffers: %w", err)
	}
	q.mem = mem
	q.efdBuf = mem[entries*per : entries*per+8]
	q.entries = make([]ringEnt, entries)
	for i := range q.entries {
		e := &q.entries[i]
		base := i * per
		e.hdr = mem[base : base+ringHeaderSize]
		e.pay = mem[base+4096 : base+per]
		e.iov[0].Base, e.iov[0].Len = &e.hdr[0], uint64(len(e.hdr))
		e.iov[1].Base, e.iov[1].Len = &e.pay[0], uint64(len(e.pay))
	}
	// Room for a commit per entry, the wake read and the file reads of
	// planned READs (more are submitted when it fills up).
	ring, err := uring.New(uint32(4*entries+1), uring.SetupSingleIssuer|uring.SetupDeferTaskrun)
	if err != nil {
		return fmt.Errorf("fusefs: io_uring: %w", err)
	}
	q.ring = ring
	// One fixed-buffer slot per entry, filled with the entry's payload
	// the first time it carries a large read or write (fixedMin).
	if ring.RegisterSparseBuffers(uint32(entries)) != nil {
		for i := range q.entries {
			q.entries[i].fixed = -1
		}
	}
	for i := range q.entries {
		e := &q.entries[i]
		if q.rs.refuseEntry != nil && q.rs.refuseEntry(q.qid, i) {
			e.iov[1].Len = 4096 // below the connection's payload size
		}
		sqe := ring.GetSQE()
		sqe.PrepURingCmd(int32(q.rs.fd), uringCmdRegister, uint64(uintptr(unsafe.Pointer(&e.iov[0]))), 2, uint64(i))
		q.putCmdReq(sqe.Cmd(), 0)
	}
	q.armWake()
	if _, err := ring.Submit(); err != nil {
		return fmt.Errorf("fusefs: register ring entries: %w", err)
	}
	// A registration the kernel refuses completes at once (posted during
	// the submit, DEFER_TASKRUN or not); an accepted one stays pending.
	q.live = len(q.entries)
	var refused error
	for {
		c, ok := q.ring.PeekCQE()
		if !ok {
			break
		}
		if c.UserData != wakeTag && c.Res < 0 {
			q.live--
			if refused == nil {
				refused = fmt.Errorf("fusefs: register ring entry %d on queue %d: %w", c.UserData, q.qid, syscall.Errno(-c.Res))
			}
		}
		q.ring.SeenCQE()
	}
	if refused != nil {
		if q.live == 0 {
			return refused
		}
		log.Printf("%v; the queue serves with %d of %d entries", refused, q.live, len(q.entries))
	}
	return nil
}

func (q *ringQueue) putCmdReq(cmd []byte, commitID uint64) {
	// struct fuse_uring_cmd_req: flags u64, commit_id u64, qid u16.
	clear(cmd[:24])
	binary.LittleEndian.PutUint64(cmd[8:], commitID)
	binary.LittleEndian.PutUint16(cmd[16:], uint16(q.qid))
}

func (q *ringQueue) armWake() {
	sqe := q.getSQE()
	if sqe == nil {
		return
	}
	sqe.PrepRead(int32(q.efd), q.efdBuf, 0, wakeTag)
}

// serve answers requests until every entry is gone (the connection ended)
// or stop is set.
func (q *ringQueue) serve() error {
	var last error
	for q.live > 0 {
		if _, err := q.ring.SubmitAndWait(1); err != nil {
			// EAGAIN, EBUSY: out of resources for now, or completions
			// to reap first; reap and go round again.
			if !errors.Is(err, syscall.EAGAIN) && !errors.Is(err, syscall.EBUSY) {
				return fmt.Errorf("fusefs: io_uring_enter: %w", err)
			}
		}
		stop := false
		var broken error
		q.ring.ForEachCQE(func(c uring.CQE) {
			switch {
			case c.UserData&ioTag != 0:
				q.ioDone(c)
			case c.UserData == wakeTag:
				stop = stop || q.stop.Load()
				q.commitFinished()
				q.armWake()
			case c.Res < 0:
				q.live--
				last = syscall.Errno(-c.Res)
				if !connEnded(last) && broken == nil {
					// The kernel refused a commit: the entry is
					// gone, and its request may never be answered.
					broken = fmt.Errorf("fusefs: queue %d: commit of entry %d: %w", q.qid, c.UserData, last)
				}
			default:
				i := int(c.UserData)
				q.rs.requests.Add(1)
				if q.handle(i) {
					q.commit(i)
				}
			}
		})
		if broken != nil {
			return broken
		}
		if q.failed != nil {
			return q.failed
		}
		if stop {
			return nil
		}
	}
	// The connection ended (unmount, abort, the server's own exit): not a
	// failure to report.
	if connEnded(last) {
		return nil
	}
	return last
}

// connEnded reports whether an entry's command ended because the
// connection did (unmount, abort, the server's exit, the ring closing).
func connEnded(err error) bool {
	return errors.Is(err, syscall.ENOTCONN) || errors.Is(err, syscall.ECANCELED) || errors.Is(err, syscall.ECONNABORTED)
}

// getSQE returns a free SQE, submitting what is queued if the ring is full.
func (q *ringQueue) getSQE() *uring.SQE {
	for {
		if sqe := q.ring.GetSQE(); sqe != nil {
			return sqe
		}
		if _, err := q.ring.Submit(); err != nil && !errors.Is(err, syscall.EAGAIN) && !errors.Is(err, syscall.EBUSY) {
			// The ring itself failed; nothing more can be queued, and
			// serve ends with the error (the connection is aborted).
			if q.failed == nil {
				q.failed = fmt.Errorf("fusefs: queue %d: io_uring submit: %w", q.qid, err)
			}
			return nil
		}
	}
}

// startIO submits the plan's file reads or writes for entry i; ioDone
// answers the entry when the last one completes.
func (q *ringQueue) startIO(i int, pl *blockio.Plan) {
	e := &q.entries[i]
	e.plan, e.pending, e.status = pl, 0, fuse.OK
	if pl.Write {
		q.writing++
	}
	for k, sg := range pl.Segs {
		sqe := q.getSQE()
		if sqe == nil {
			e.status = fuse.EIO
			break
		}
		ud := ioTag | uint64(i)<<segBits | uint64(k)
		fixed := q.fixedBuf(i, sg.Buf)
		switch {
		case pl.Write && fixed:
			sqe.PrepWriteFixed(int32(sg.Fd), sg.Buf, uint64(sg.Off), uint16(i), ud)
		case pl.Write:
			sqe.PrepWrite(int32(sg.Fd), sg.Buf, uint64(sg.Off), ud)
		case fixed:
			sqe.PrepReadFixed(int32(sg.Fd), sg.Buf, uint64(sg.Off), uint16(i), ud)
		default:
			sqe.PrepRead(int32(sg.Fd), sg.Buf, uint64(sg.Off), ud)
		}
		if !pl.Write {
			sqe.OpFlags = uint32(sg.Flags)
		}
		if fixed {
			q.rs.fixedIO.Add(1)
		}
		e.pending++
	}
	if e.pending == 0 {
		q.endIO(i)
	}
}

func (q *ringQueue) ioDone(c uring.CQE) {
	i := int(c.UserData&^ioTag) >> segBits
	k := int(c.UserData & (1<<segBits - 1))
	e := &q.entries[i]
	sg := e.plan.Segs[k]
	switch {
	case c.Res < 0:
		e.status = q.rs.rfs.errno(syscall.Errno(-c.Res))
	case int(c.Res) < len(sg.Buf) && e.plan.Write:
		// A short write (a disk filling up): the rest here, where an
		// error has its cause.
		if err := pwriteAll(sg.Fd, sg.Buf[c.Res:], sg.Off+int64(c.Res)); err != nil {
			e.status = q.rs.rfs.errno(err)
		}
	case int(c.Res) < len(sg.Buf):
		clear(sg.Buf[c.Res:]) // past the end of a shorter layer's file
	}
	e.pending--
	if e.pending == 0 {
		q.endIO(i)
	}
}

// pwriteAll writes all of p at off to fd.
func pwriteAll(fd int, p []byte, off int64) error {
	for len(p) > 0 {
		n, err := unix.Pwrite(fd, p, off)
		if err != nil {
			return err
		}
		if n == 0 {
			return syscall.EIO
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

func (q *ringQueue) endIO(i int) {
	e := &q.entries[i]
	pl := e.plan
	if pl.Write && e.status == fuse.OK {
		pl.Commit()
	}
	q.release(e)
	n := pl.N
	if pl.Write {
		out := fuse.WriteOut{Size: uint32(pl.N)}
		n = putOut(e, &out)
	}
	reply(e, e.status, n)
	q.commit(i)
}

// drainIO waits for the file reads and writes still in flight (their
// buffers and files must outlive them) and releases their plans; the
// writes among them count as failed.
func (q *ringQueue) drainIO() {
	inflight := 0
	for i := range q.entries {
		inflight += q.entries[i].pending
	}
	for inflight > 0 {
		if _, err := q.ring.SubmitAndWait(1); err != nil {
			break
		}
		q.ring.ForEachCQE(func(c uring.CQE) {
			if c.UserData&ioTag == 0 {
				return
			}
			e := &q.entries[int(c.UserData&^ioTag)>>segBits]
			e.pending--
			inflight--
			if e.pending == 0 && e.plan != nil {
				q.release(e)
			}
		})
	}
	for i := range q.entries {
		if e := &q.entries[i]; e.plan != nil {
			q.release(e)
		}
	}
}

// release releases e's plan without answering it.
func (q *ringQueue) release(e *ringEnt) {
	if e.plan.Write {
		q.writing--
	}
	e.plan.Release()
	e.plan = nil
}

// commit answers entry i and asks for its next request.
func (q *ringQueue) commit(i int) {
	e := &q.entries[i]
	sqe := q.getSQE()
	if sqe == nil {
		return // the ring failed (q.failed): serve ends and aborts
	}
	id := binary.LittleEndian.Uint64(e.hdr[ringEntCommitOff:])
	if q.rs.badCommit.CompareAndSwap(true, false) {
		id += 1 << 40
	}
	sqe.PrepURingCmd(int32(q.rs.fd), uringCmdCommitAndFetch, 0, 0, uint64(i))
	q.putCmdReq(sqe.Cmd(), id)
}

func (q *ringQueue) commitFinished() {
	q.mu.Lock()
	done := q.finished
	q.finished = nil
	q.mu.Unlock()
	for _, i := range done {
		q.commit(i)
	}
}

// finish is called off the ring thread when entry i has its reply.
func (q *ringQueue) finish(i int) {
	q.mu.Lock()
	q.finished = append(q.finished, i)
	q.mu.Unlock()
	q.wake(false)
}

// teardown closes the ring, which cancels the entries' commands; buffers
// and the eventfd go in ringServer.wait.
func (q *ringQueue) teardown() {
	if q.ring != nil {
		q.drainIO()
		q.ring.Close()
	}
}

// asyncWrite is the WRITE size from which the file is asked to plan a
// write (cow.Volume plans none smaller, and small writes are most of the
// requests), and from which a write it did not plan (the first write to
// blocks after a snapshot, or a file without WritePlanner) goes to another
// goroutine: the engine writes those past the page cache and waits for
// the disk.
const asyncWrite = 256 << 10

// reply sets entry e's answer: status and payload length.
func reply(e *ringEnt, st fuse.Status, n int) {
	unique := binary.LittleEndian.Uint64(e.hdr[8:]) // fuse_in_header.unique
	if st != fuse.OK {
		n = 0
	}
	out := e.hdr[:outHeaderSize]
	binary.LittleEndian.PutUint32(out[0:], uint32(outHeaderSize+n))
	binary.LittleEndian.PutUint32(out[4:], uint32(-int32(st)))
	binary.LittleEndian.PutUint64(out[8:], unique)
	binary.LittleEndian.PutUint32(e.hdr[ringEntPayloadOff:], uint32(n))
}

// readInto answers a READ with a (blocking) read into the entry's payload.
func readInto(r *rawFS, e *ringEnt, in *fuse.ReadIn) {
	res, st := r.Read(nil, in, e.pay[:min(int(in.Size), len(e.pay))])
	n := 0
	if st == fuse.OK {
		b, _ := res.Bytes(e.pay)
		n = len(b)
		if n > 0 && &b[0] != &e.pay[0] {
			n = copy(e.pay, b)
		}
	}
	reply(e, st, n)
}

// writeFrom answers a WRITE with its data from the entry's payload.
func writeFrom(r *rawFS, e *ringEnt, in *fuse.WriteIn) {
	written, st := r.Write(nil, in, e.pay[:in.Size])
	out := fuse.WriteOut{Size: written}
	reply(e, st, putOut(e, &out))
}

// inArg returns the request as go-fuse's struct T: the fuse_in_header from
// in_out, the first argument from op_in.
func inArg[T any](e *ringEnt) *T {
	v := new(T)
	b := unsafe.Slice((*byte)(unsafe.Pointer(v)), unsafe.Sizeof(*v))
	copy(b[:inHeaderSize], e.hdr[:inHeaderSize])
	copy(b[inHeaderSize:], e.hdr[ringOpInOff:ringOpInOff+ringOpInSize])
	return v
}

// putOut copies a reply struct into the payload and returns its size.
func putOut[T any](e *ringEnt, v *T) int {
	return copy(e.pay, unsafe.Slice((*byte)(unsafe.Pointer(v)), unsafe.Sizeof(*v)))
}

func (e *ringEnt) payloadSize() int {
	return int(binary.LittleEndian.Uint32(e.hdr[ringEntPayloadOff:]))
}

// handle answers entry i's request. It returns false when the answer comes
// later, from the ring or another goroutine (finish).
func (q *ringQueue) handle(i int) bool {
	h := (*fuse.InHeader)(unsafe.Pointer(&q.entries[i].hdr[0]))
	if h.Opcode == opPoll {
		q.rs.polls.Add(1)
	}
	if q.writing > 0 && h.Opcode != opRead && h.Opcode != opWrite {
		// Planned writes in flight may hold a lock until this thread
		// completes them (a volume's write barrier), and a snapshot
		// waiting for that lock makes everyone else who wants it wait
		// too: this thread must not be among them. READ and WRITE
		// only use methods that do not wait (ReadAtNoWait, PlanRead,
		// PlanWrite) or go to goroutines; the rest goes to one here.
		q.rs.workers.Add(1)
		go func() {
			defer q.rs.workers.Done()
			if q.answer(i) {
				q.finish(i)
			}
		}()
		return false
	}
	return q.answer(i)
}

// answer answers entry i's request like handle. Only READ and WRITE use
// the ring (those are answered on its thread).
func (q *ringQueue) answer(i int) bool {
	e := &q.entries[i]
	r := q.rs.rfs
	h := (*fuse.InHeader)(unsafe.Pointer(&e.hdr[0]))
	if h.NodeId == pollHackIno {
		pollHackReply(e, h)
		return true
	}
	switch h.Opcode {
	case opRead:
		in := inArg[fuse.ReadIn](e)
		if n, st, wait := r.readNoWait(in, e.pay); !wait {
			reply(e, st, n)
			break
		}
		// From disk: through the ring if the file can plan the read,
		// else another goroutine waits for it.
		if pl, st, ok := r.planRead(in, e.pay); ok {
			if st != fuse.OK {
				reply(e, st, 0)
				break
			}
			q.startIO(i, pl)
			return false
		}
		// A copy for the goroutine, so that the request itself stays on
		// this thread's stack (no allocation per READ).
		cp := *in
		q.rs.workers.Add(1)
		go func() {
			defer q.rs.workers.Done()
			readInto(r, e, &cp)
			q.finish(i)
		}()
		return false
	case opWrite:
		in := inArg[fuse.WriteIn](e)
		if int(in.Size) > e.payloadSize() {
			reply(e, fuse.EINVAL, 0)
			break
		}
		// Large writes through the ring where the file can plan them
		// (past the page cache, so they wait for the disk without a
		// thread); small ones are not planned, and not asked about.
		if in.Size >= asyncWrite {
			if pl, st, ok := r.planWrite(in, e.pay[:in.Size]); ok {
				if st != fuse.OK {
					reply(e, st, 0)
					break
				}
				q.startIO(i, pl)
				return false
			}
		}
		// WriteAt may wait for what planned writes in flight hold.
		if in.Size < asyncWrite && q.writing == 0 {
			writeFrom(r, e, in)
			break
		}
		q.rs.workers.Add(1)
		go func() {
			defer q.rs.workers.Done()
			writeFrom(r, e, in)
			q.finish(i)
		}()
		return false
	case opFsync, opFallocate:
		// Durability and hole punching can take milliseconds: off the
		// ring thread, so the queue keeps serving.
		op := h.Opcode
		var fs *fuse.FsyncIn
		var fa *fuse.FallocateIn
		if op == opFsync {
			fs = inArg[fuse.FsyncIn](e)
		} else {
			fa = inArg[fuse.FallocateIn](e)
		}
		q.rs.workers.Add(1)
		go func() {
			defer q.rs.workers.Done()
			var st fuse.Status
			if fs != nil {
				st = r.Fsync(nil, fs)
			} else {
				st = r.Fallocate(nil, fa)
			}
			reply(e, st, 0)
			q.finish(i)
		}()
		return false
	case opGetattr:
		var out fuse.AttrOut
		st := r.GetAttr(nil, inArg[fuse.GetAttrIn](e), &out)
		reply(e, st, putOut(e, &out))
	case opSetattr:
		var out fuse.AttrOut
		st := r.SetAttr(nil, inArg[fuse.SetAttrIn](e), &out)
		reply(e, st, putOut(e, &out))
	case opLookup:
		name := lookupName(e)
		if h.NodeId == rootIno && name == pollHackName {
			pollHackReply(e, h)
			break
		}
		var out fuse.EntryOut
		st := r.Lookup(nil, h, name, &out)
		reply(e, st, putOut(e, &out))
	case opOpen, opOpendir:
		in := inArg[fuse.OpenIn](e)
		var out fuse.OpenOut
		var st fuse.Status
		if h.Opcode == opOpen {
			st = r.Open(nil, in, &out)
		} else {
			st = r.OpenDir(nil, in, &out)
		}
		reply(e, st, putOut(e, &out))
	case opRelease:
		r.Release(nil, inArg[fuse.ReleaseIn](e))
		reply(e, fuse.OK, 0)
	case opReleasedir:
		r.ReleaseDir(inArg[fuse.ReleaseIn](e))
		reply(e, fuse.OK, 0)
	case opFlush:
		reply(e, r.Flush(nil, inArg[fuse.FlushIn](e)), 0)
	case opReaddir:
		in := inArg[fuse.ReadIn](e)
		l := fuse.NewDirEntryList(e.pay[:min(int(in.Size), len(e.pay))], in.Offset)
		st := r.ReadDir(nil, in, l)
		reply(e, st, len(l.Bytes()))
	case opStatfs:
		var out fuse.StatfsOut
		st := r.StatFs(nil, h, &out)
		reply(e, st, putOut(e, &out))
	case opSymlink, opMknod, opMkdir, opUnlink, opRmdir, opRename, opLink, opCreate, opRename2, opTmpfile:
		reply(e, fuse.EPERM, 0)
	default:
		// What go-fuse answers for operations the filesystem lacks;
		// the kernel stops sending most of them.
		reply(e, fuse.ENOSYS, 0)
	}
	return true
}

// lookupName is a LOOKUP request's name (NUL-terminated in the payload).
func lookupName(e *ringEnt) string {
	name := e.pay[:e.payloadSize()]
	for k, c := range name {
		if c == 0 {
			name = name[:k]
			break
		}
	}
	return string(name)
}

// pollHackReply answers a request for go-fuse's poll-hack file as go-fuse
// does on /dev/fuse (its poll.go): on the ring the requests come here, not
// to go-fuse, and without this pollHack would find no file, the kernel
// would keep sending FUSE_POLL, and the first Go open of a volume file in
// this process would deadlock it (see pollHack).
func pollHackReply(e *ringEnt, h *fuse.InHeader) {
	attr := fuse.Attr{Ino: pollHackIno, Mode: syscall.S_IFREG | 0o644, Nlink: 1}
	switch h.Opcode {
	case opLookup:
		out := fuse.EntryOut{NodeId: pollHackIno, Attr: attr}
		reply(e, fuse.OK, putOut(e, &out))
	case opOpen:
		out := fuse.OpenOut{Fh: pollHackIno}
		reply(e, fuse.OK, putOut(e, &out))
	case opGetattr, opSetattr:
		out := fuse.AttrOut{Attr: attr}
		reply(e, fuse.OK, putOut(e, &out))
	case opPoll:
		reply(e, fuse.ENOSYS, 0) // what the hack is for: no more POLLs
	case opFlush, opRelease:
		reply(e, fuse.OK, 0)
	default:
		// Not ENOSYS: that would turn the operation off for the whole
		// connection.
		reply(e, fuse.Status(syscall.ERANGE), 0)
	}
}

// possibleCPUs is the kernel's nr_cpu_ids: the number of queues a ring
// needs before the kernel uses it.
func possibleCPUs() (int, error) {
	b, err := os.ReadFile("/sys/devices/system/cpu/possible")
	if err != nil {
		return 0, fmt.Errorf("fusefs: %w", err)
	}
	// "0-N" or "0"; ranges with gaps still end at the highest CPU.
	s := string(b)
	for len(s) > 0 && (s[len(s)-1] == '\n') {
		s = s[:len(s)-1]
	}
	last := s
	for k := len(s) - 1; k >= 0; k-- {
		if s[k] == '-' || s[k] == ',' {
			last = s[k+1:]
			break
		}
	}
	var n int
	if _, err := fmt.Sscan(last, &n); err != nil {
		return 0, fmt.Errorf("fusefs: possible CPUs %q: %w", s, err)
	}
	return n + 1, nil
}
