package fusefs

import (
	"encoding/binary"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// The FUSE over io_uring wire format (include/uapi/linux/fuse.h): what a
// ring entry's header holds, and how requests and replies are read from
// and written to an entry.
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

func (q *ringQueue) putCmdReq(cmd []byte, commitID uint64) {
	// struct fuse_uring_cmd_req: flags u64, commit_id u64, qid u16.
	clear(cmd[:24])
	binary.LittleEndian.PutUint64(cmd[8:], commitID)
	binary.LittleEndian.PutUint16(cmd[16:], uint16(q.qid))
}

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
