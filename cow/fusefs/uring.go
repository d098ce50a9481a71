package fusefs

import (
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

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
// queue is registered, FORGET and INTERRUPT, and it writes notifications
// (docs/DECISIONS.md, "FUSE over io_uring instead of /dev/fuse").
//
// This file runs the queues; uring_proto.go has the wire format,
// uring_answer.go answers requests, uring_io.go submits the file reads and
// writes of planned requests, uring_start.go turns the ring on.

const (
	// user_data of the eventfd read that wakes a queue for completions of
	// requests answered off the ring thread.
	wakeTag = 1 << 63
	// user_data of a read or write of a layer file (a plan's segment):
	// ioTag | entry<<segBits | seg.
	ioTag   = 1 << 62
	segBits = 24
)

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

// setup makes queue q's entries, pins its thread to its CPU, creates its
// ring and registers the entries with the kernel.
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

	if err := q.mapEntries(entries, payload); err != nil {
		return err
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
	return q.register()
}

// mapEntries maps the headers and payloads of entries entries (a header
// page and payload bytes rounded up to pages each) and the eventfd read's
// target, and lays the entries out in them.
func (q *ringQueue) mapEntries(entries, payload int) error {
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
	return nil
}

// register submits the registration of every entry and arms the wake read.
// The queue serves with the entries the kernel accepted; it fails only if
// the kernel refused them all.
func (q *ringQueue) register() error {
	for i := range q.entries {
		e := &q.entries[i]
		if q.rs.refuseEntry != nil && q.rs.refuseEntry(q.qid, i) {
			e.iov[1].Len = 4096 // below the connection's payload size
		}
		sqe := q.ring.GetSQE()
		sqe.PrepURingCmd(int32(q.rs.fd), uringCmdRegister, uint64(uintptr(unsafe.Pointer(&e.iov[0]))), 2, uint64(i))
		q.putCmdReq(sqe.Cmd(), 0)
	}
	q.armWake()
	if _, err := q.ring.Submit(); err != nil {
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
		klog.ErrorS(refused, "FUSE ring queue serves with fewer entries", "queue", q.qid, "entries", q.live, "wanted", len(q.entries))
	}
	return nil
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
