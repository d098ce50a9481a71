//go:build linux

package uring

import (
	"math"
	"unsafe"
)

// Opcodes (enum io_uring_op) this package issues.
const (
	opNop        uint8 = 0
	opReadFixed  uint8 = 4
	opWriteFixed uint8 = 5
	opRead       uint8 = 22
	opWrite      uint8 = 23
	opURingCmd   uint8 = 46
)

// sqeCmdSize is the length of the URING_CMD payload in a 128-byte SQE: the
// kernel treats everything from offset 48 to the end as command data.
const sqeCmdSize = 80

// SQE is one 128-byte submission queue entry (struct io_uring_sqe as laid out
// under IORING_SETUP_SQE128). The unions of the C struct are collapsed onto
// one name each; the alternate meanings are noted per field.
//
// An *SQE returned by Ring.GetSQE points into memory shared with the kernel
// and is only valid until the next Submit/SubmitAndWait/WaitCQE: after that
// the slot may be handed out again.
type SQE struct {
	Opcode uint8  // @0
	Flags  uint8  // @1, IOSQE_* bits
	IOPrio uint16 // @2
	Fd     int32  // @4
	// Off is the file offset; also addr2, and for URING_CMD its first four
	// bytes are cmd_op (use setCmdOp/CmdOp, which are endian-neutral).
	Off         uint64 // @8
	Addr        uint64 // @16, buffer address (also splice_off_in)
	Len         uint32 // @24
	OpFlags     uint32 // @28, rw_flags / fsync_flags / uring_cmd_flags / ...
	UserData    uint64 // @32, copied to the CQE
	BufIndex    uint16 // @40, also buf_group
	Personality uint16 // @42
	SpliceFdIn  int32  // @44, also file_index / optlen / addr_len
	// Addr3 overlaps the first 8 bytes of the URING_CMD payload (Cmd).
	Addr3 uint64   // @48
	pad2  uint64   // @56
	ext   [64]byte // @64, second half of a 128-byte SQE
}

// Cmd returns the 80-byte URING_CMD payload area (offsets 48..127). The slice
// aliases the SQE, so writes go straight into the submission slot.
func (s *SQE) Cmd() []byte {
	return unsafe.Slice((*byte)(unsafe.Pointer(&s.Addr3)), sqeCmdSize)
}

// setCmdOp stores cmd_op, which shares offset 8 with Off.
func (s *SQE) setCmdOp(op uint32) {
	// Written through a *uint32 rather than as Off's low bits so the layout
	// is right on big-endian too: cmd_op is the first four bytes, not the low
	// half of the integer.
	*(*uint32)(unsafe.Pointer(&s.Off)) = op
}

// CmdOp reads cmd_op back (see setCmdOp).
func (s *SQE) cmdOp() uint32 {
	return *(*uint32)(unsafe.Pointer(&s.Off))
}

// prepNop fills s as a no-op whose completion carries userData and res 0.
func (s *SQE) prepNop(userData uint64) {
	*s = SQE{Opcode: opNop, Fd: -1, UserData: userData}
}

// PrepURingCmd fills s as IORING_OP_URING_CMD. addr and length mean whatever
// the driver behind fd says (for /dev/fuse: an iovec array and its count);
// the command payload is left zeroed for the caller to fill through Cmd.
//
// addr is taken as a plain integer, so nothing here keeps the memory it
// names alive or in place: it must be mmapped, or heap memory that the caller
// keeps referenced until the command's CQE has been reaped. Never point it at
// something that may live on a goroutine stack, since stacks move.
func (s *SQE) PrepURingCmd(fd int32, cmdOp uint32, addr uint64, length uint32, userData uint64) {
	*s = SQE{Opcode: opURingCmd, Fd: fd, Addr: addr, Len: length, UserData: userData}
	s.setCmdOp(cmdOp)
}

// PrepRead fills s as IORING_OP_READ of len(buf) bytes at off into buf.
// An off of ^uint64(0) means the file's current position.
//
// The kernel writes into buf after Submit returns, so the caller must keep
// buf referenced and untouched until the CQE for userData has been reaped.
// Nothing is retained by the Ring.
func (s *SQE) PrepRead(fd int32, buf []byte, off uint64, userData uint64) {
	s.prepRW(opRead, fd, uintptr(unsafe.Pointer(unsafe.SliceData(buf))), rwLen(buf), off, userData)
}

// PrepWrite fills s as IORING_OP_WRITE of buf at off. The same ownership
// rule as PrepRead applies: buf must stay referenced and unmodified until
// the CQE has been reaped.
func (s *SQE) PrepWrite(fd int32, buf []byte, off uint64, userData uint64) {
	s.prepRW(opWrite, fd, uintptr(unsafe.Pointer(unsafe.SliceData(buf))), rwLen(buf), off, userData)
}

// PrepReadFixed is PrepRead into a registered buffer: buf must lie within
// the buffer registered at index (Ring.UpdateBuffer). The kernel took
// the pages' references when they were registered, so a direct read into
// them skips pinning the pages again for each request.
func (s *SQE) PrepReadFixed(fd int32, buf []byte, off uint64, index uint16, userData uint64) {
	s.prepRW(opReadFixed, fd, uintptr(unsafe.Pointer(unsafe.SliceData(buf))), rwLen(buf), off, userData)
	s.BufIndex = index
}

// PrepWriteFixed is PrepWrite from a registered buffer (see PrepReadFixed).
func (s *SQE) PrepWriteFixed(fd int32, buf []byte, off uint64, index uint16, userData uint64) {
	s.prepRW(opWriteFixed, fd, uintptr(unsafe.Pointer(unsafe.SliceData(buf))), rwLen(buf), off, userData)
	s.BufIndex = index
}

func rwLen(buf []byte) uint32 {
	if len(buf) > math.MaxUint32 {
		panic("uring: buffer longer than 4 GiB")
	}
	return uint32(len(buf))
}

// prepRW takes the buffer as uintptr, which would normally let the compiler
// keep a non-escaping []byte on the goroutine stack; the kernel would then
// write to a stale address once the stack grows and moves. uintptrescapes
// makes any pointer converted in the call expression escape to the heap,
// where Go never moves it.
//
//go:uintptrescapes
func (s *SQE) prepRW(op uint8, fd int32, addr uintptr, length uint32, off, userData uint64) {
	*s = SQE{Opcode: op, Fd: fd, Off: off, Addr: uint64(addr), Len: length, UserData: userData}
}
