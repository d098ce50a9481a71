package ondisk

import (
	"sort"
)

// The catalog log: a preallocated file of frames. Each frame is one atomic
// catalog transaction (a list of ops) or a checkpoint (the whole catalog,
// which replaces everything before it). A frame is durable once the fdatasync
// after it returns; a torn last frame fails its checksum and is dropped.
//
//	frame := magic u32 | version u16 | kind u16 | length u32 | payload | crc32c u32
//
// The CRC covers header and payload.

const (
	frameMagic     = 0x31435743 // "CWC1"
	CatalogVersion = 1
	frameHeader    = 12
	frameTrailer   = 4
	// MaxFramePayload bounds a frame so that a damaged length cannot make the
	// reader allocate without limit.
	MaxFramePayload = 256 << 20
)

// FrameKind says how a frame's ops apply.
type FrameKind uint16

const (
	// FrameTxn ops apply on top of the state so far.
	FrameTxn FrameKind = 1
	// FrameCheckpoint ops describe the whole state: the reader resets first.
	FrameCheckpoint FrameKind = 2
)

// OpKind is the kind of one catalog op.
type OpKind uint8

const (
	OpPutVolume OpKind = iota + 1
	OpDelVolume
	OpPutSnapshot
	OpDelSnapshot
	OpPutLayer
	OpDelLayer
)

// VolumeRec is a volume in the catalog.
type VolumeRec struct {
	ID             string
	Size           int64
	Head           uint32
	SourceSnapshot string
	SourceVolume   string
	Labels         map[string]string
	Created        int64 // unix nanoseconds
}

// SnapshotRec is a snapshot in the catalog.
type SnapshotRec struct {
	ID       string
	VolumeID string
	Layer    uint32
	Size     int64
	Labels   map[string]string
	Created  int64
}

// LayerRec is a layer: a data file plus its journal, above Parent (0: none).
type LayerRec struct {
	Num    uint32
	Parent uint32
	Size   int64
	Frozen bool
}

// Op is one catalog mutation. Exactly the field its Kind names is used:
// Volume/Snapshot/Layer for puts, ID (volume, snapshot) or Num (layer) for
// deletes.
type Op struct {
	Kind     OpKind
	Volume   *VolumeRec
	Snapshot *SnapshotRec
	Layer    *LayerRec
	ID       string
	Num      uint32
}

type encoder struct{ b []byte }

func (e *encoder) u8(v uint8)   { e.b = append(e.b, v) }
func (e *encoder) u32(v uint32) { e.b = le.AppendUint32(e.b, v) }
func (e *encoder) i64(v int64)  { e.b = le.AppendUint64(e.b, uint64(v)) }
func (e *encoder) str(s string) {
	e.u32(uint32(len(s)))
	e.b = append(e.b, s...)
}
func (e *encoder) labels(m map[string]string) {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	e.u32(uint32(len(keys)))
	for _, k := range keys {
		e.str(k)
		e.str(m[k])
	}
}

type decoder struct {
	b   []byte
	err error
}

func (d *decoder) take(n int) []byte {
	if d.err != nil {
		return nil
	}
	if n < 0 || n > len(d.b) {
		d.err = corrupt("catalog record truncated")
		return nil
	}
	v := d.b[:n]
	d.b = d.b[n:]
	return v
}
func (d *decoder) u8() uint8 {
	if b := d.take(1); b != nil {
		return b[0]
	}
	return 0
}
func (d *decoder) u32() uint32 {
	if b := d.take(4); b != nil {
		return le.Uint32(b)
	}
	return 0
}
func (d *decoder) i64() int64 {
	if b := d.take(8); b != nil {
		return int64(le.Uint64(b))
	}
	return 0
}
func (d *decoder) str() string {
	n := d.u32()
	if n > 1<<20 {
		d.err = corrupt("catalog string of %d bytes", n)
		return ""
	}
	return string(d.take(int(n)))
}
func (d *decoder) labels() map[string]string {
	n := d.u32()
	if n == 0 || d.err != nil {
		return nil
	}
	if n > 4096 {
		d.err = corrupt("catalog labels: %d entries", n)
		return nil
	}
	m := make(map[string]string, n)
	for i := uint32(0); i < n && d.err == nil; i++ {
		k := d.str()
		m[k] = d.str()
	}
	return m
}

func encodeOp(e *encoder, op Op) {
	e.u8(uint8(op.Kind))
	switch op.Kind {
	case OpPutVolume:
		v := op.Volume
		e.str(v.ID)
		e.i64(v.Size)
		e.u32(v.Head)
		e.str(v.SourceSnapshot)
		e.str(v.SourceVolume)
		e.labels(v.Labels)
		e.i64(v.Created)
	case OpPutSnapshot:
		s := op.Snapshot
		e.str(s.ID)
		e.str(s.VolumeID)
		e.u32(s.Layer)
		e.i64(s.Size)
		e.labels(s.Labels)
		e.i64(s.Created)
	case OpPutLayer:
		l := op.Layer
		e.u32(l.Num)
		e.u32(l.Parent)
		e.i64(l.Size)
		if l.Frozen {
			e.u8(1)
		} else {
			e.u8(0)
		}
	case OpDelVolume, OpDelSnapshot:
		e.str(op.ID)
	case OpDelLayer:
		e.u32(op.Num)
	default:
		panic("ondisk: unknown op kind")
	}
}

func decodeOp(d *decoder) Op {
	op := Op{Kind: OpKind(d.u8())}
	switch op.Kind {
	case OpPutVolume:
		op.Volume = &VolumeRec{ID: d.str(), Size: d.i64(), Head: d.u32(), SourceSnapshot: d.str(),
			SourceVolume: d.str(), Labels: d.labels(), Created: d.i64()}
	case OpPutSnapshot:
		op.Snapshot = &SnapshotRec{ID: d.str(), VolumeID: d.str(), Layer: d.u32(), Size: d.i64(),
			Labels: d.labels(), Created: d.i64()}
	case OpPutLayer:
		op.Layer = &LayerRec{Num: d.u32(), Parent: d.u32(), Size: d.i64()}
		switch d.u8() {
		case 0:
		case 1:
			op.Layer.Frozen = true
		default:
			d.err = corrupt("layer frozen flag")
		}
	case OpDelVolume, OpDelSnapshot:
		op.ID = d.str()
	case OpDelLayer:
		op.Num = d.u32()
	default:
		if d.err == nil {
			d.err = corrupt("unknown op kind %d", op.Kind)
		}
	}
	return op
}

// EncodeFrame encodes ops as one frame.
func EncodeFrame(kind FrameKind, ops []Op) []byte {
	e := &encoder{b: make([]byte, frameHeader, 256)}
	e.u32(uint32(len(ops)))
	for _, op := range ops {
		encodeOp(e, op)
	}
	b := e.b
	le.PutUint32(b[0:], frameMagic)
	le.PutUint16(b[4:], CatalogVersion)
	le.PutUint16(b[6:], uint16(kind))
	le.PutUint32(b[8:], uint32(len(b)-frameHeader))
	return le.AppendUint32(b, Checksum(b))
}

// DecodeFrame decodes the frame at the start of b and returns it with its
// encoded length. It returns ErrEnd when b starts with the zero-filled tail.
func DecodeFrame(b []byte) (FrameKind, []Op, int, error) {
	if len(b) < frameHeader {
		if allZero(b) {
			return 0, nil, 0, ErrEnd
		}
		return 0, nil, 0, corrupt("frame header truncated")
	}
	magic := le.Uint32(b[0:])
	if magic == 0 && allZero(b[:frameHeader]) {
		return 0, nil, 0, ErrEnd
	}
	if magic != frameMagic {
		return 0, nil, 0, corrupt("frame: bad magic")
	}
	n := le.Uint32(b[8:])
	if n > MaxFramePayload || int(n)+frameHeader+frameTrailer > len(b) {
		return 0, nil, 0, corrupt("frame: bad length %d", n)
	}
	total := frameHeader + int(n) + frameTrailer
	if Checksum(b[:total-frameTrailer]) != le.Uint32(b[total-frameTrailer:]) {
		return 0, nil, 0, corrupt("frame: bad checksum")
	}
	if v := le.Uint16(b[4:]); v != CatalogVersion {
		return 0, nil, 0, ErrVersion
	}
	kind := FrameKind(le.Uint16(b[6:]))
	if kind != FrameTxn && kind != FrameCheckpoint {
		return 0, nil, 0, corrupt("frame: unknown kind %d", kind)
	}
	d := &decoder{b: b[frameHeader : total-frameTrailer]}
	count := d.u32()
	if int64(count) > int64(len(d.b)) { // every op takes at least one byte
		return 0, nil, 0, corrupt("frame: %d ops in %d bytes", count, len(d.b))
	}
	ops := make([]Op, 0, count)
	for i := uint32(0); i < count && d.err == nil; i++ {
		ops = append(ops, decodeOp(d))
	}
	if d.err != nil {
		return 0, nil, 0, d.err
	}
	if len(d.b) != 0 {
		return 0, nil, 0, corrupt("frame: %d trailing bytes", len(d.b))
	}
	return kind, ops, total, nil
}
