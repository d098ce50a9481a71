package ondisk

import (
	"errors"
	"fmt"
)

// The extent-map journal of one layer: a header, then fixed-size records
// "blocks [Start, Start+Count) are owned by this layer". Ownership within a
// layer only ever grows (a discard owns the block and punches a hole in the
// data file), so the journal is append-only. The file is preallocated with
// zeros; replay stops at the first all-zero record. A torn or damaged last
// record is an unacknowledged flush and is dropped.
//
// Two versions. Version 1 (JournalIdentity): a block's data is at its
// volume offset in the layer's sparse data file, records carry no
// location, and replay is a union. Version 2 (JournalDense): blocks are
// appended to the data file, and each record also says where (Loc: the
// file block of the range's first block, the others following it, or
// LocZero for blocks that read as zeros and have no data); a later record
// for a block replaces an earlier one's location, so replay goes in order.

const (
	journalMagic  = 0x314d5743 // "CWM1"
	recordMagic   = 0x31525743 // "CWR1"
	recordMagicV2 = 0x32525743 // "CWR2"
	// JournalIdentity and JournalDense are the journal versions; new
	// layers are written as JournalDense.
	JournalIdentity = 1
	JournalDense    = 2
	// LocZero is the location of blocks that read as zeros (a discard)
	// in a dense layer.
	LocZero = ^uint64(0)
	// JournalHeaderSize and RecordSize are the fixed sizes of the header and of
	// one record. Both are 32 so records stay aligned.
	JournalHeaderSize = 32
	RecordSize        = 32
)

// JournalHeader identifies a layer's journal.
type JournalHeader struct {
	Layer   uint32
	Version uint16 // JournalIdentity or JournalDense
}

// EncodeJournalHeader returns the 32-byte header.
func EncodeJournalHeader(h JournalHeader) []byte {
	b := make([]byte, JournalHeaderSize)
	le.PutUint32(b[0:], journalMagic)
	le.PutUint16(b[4:], h.Version)
	le.PutUint32(b[8:], h.Layer)
	le.PutUint32(b[28:], Checksum(b[:28]))
	return b
}

// DecodeJournalHeader validates and decodes a header.
func DecodeJournalHeader(b []byte) (JournalHeader, error) {
	if len(b) < JournalHeaderSize {
		return JournalHeader{}, corrupt("journal header: %d bytes", len(b))
	}
	if le.Uint32(b[0:]) != journalMagic {
		return JournalHeader{}, corrupt("journal header: bad magic")
	}
	if Checksum(b[:28]) != le.Uint32(b[28:]) {
		return JournalHeader{}, corrupt("journal header: bad checksum")
	}
	v := le.Uint16(b[4:])
	if v != JournalIdentity && v != JournalDense {
		return JournalHeader{}, fmt.Errorf("%w: journal version %d", ErrVersion, v)
	}
	return JournalHeader{Layer: le.Uint32(b[8:]), Version: v}, nil
}

// Range is a run of blocks. Loc is where a dense layer keeps them (see
// above); identity layers leave it 0.
type Range struct {
	Start uint64
	Count uint64
	Loc   uint64
}

// End is the first block after the range.
func (r Range) End() uint64 { return r.Start + r.Count }

// maxDenseCount is the most blocks one version 2 record holds (its count
// is 32 bits); EncodeRecord splits longer ranges.
const maxDenseCount = 1<<32 - 1

// EncodeRecord appends the records for r in a journal of the given version
// to dst: one 32-byte record, or several for a dense range longer than a
// record holds.
func EncodeRecord(dst []byte, r Range, version uint16) []byte {
	var b [RecordSize]byte
	if version == JournalIdentity {
		le.PutUint32(b[0:], recordMagic)
		le.PutUint64(b[8:], r.Start)
		le.PutUint64(b[16:], r.Count)
		le.PutUint32(b[24:], Checksum(b[:24]))
		return append(dst, b[:]...)
	}
	for r.Count > 0 {
		n := min(r.Count, maxDenseCount)
		le.PutUint32(b[0:], recordMagicV2)
		le.PutUint32(b[4:], uint32(n))
		le.PutUint64(b[8:], r.Start)
		le.PutUint64(b[16:], r.Loc)
		le.PutUint32(b[24:], Checksum(b[:24]))
		dst = append(dst, b[:]...)
		r.Start += n
		r.Count -= n
		if r.Loc != LocZero {
			r.Loc += n
		}
	}
	return dst
}

// DecodeRecord decodes one record of a journal of the given version. It
// returns ErrEnd for an all-zero record (the unwritten, preallocated tail)
// and ErrCorrupt for anything damaged.
func DecodeRecord(b []byte, version uint16) (Range, error) {
	if len(b) < RecordSize {
		return Range{}, corrupt("record: %d bytes", len(b))
	}
	b = b[:RecordSize]
	if allZero(b) {
		return Range{}, ErrEnd
	}
	magic := uint32(recordMagic)
	if version == JournalDense {
		magic = recordMagicV2
	}
	if le.Uint32(b[0:]) != magic || Checksum(b[:24]) != le.Uint32(b[24:]) {
		return Range{}, corrupt("record: bad magic or checksum")
	}
	r := Range{Start: le.Uint64(b[8:]), Count: le.Uint64(b[16:])}
	if version == JournalDense {
		r.Count, r.Loc = uint64(le.Uint32(b[4:])), le.Uint64(b[16:])
		if r.Loc != LocZero && r.Loc+r.Count < r.Loc {
			return Range{}, corrupt("record: bad location %d+%d", r.Loc, r.Count)
		}
	}
	if r.Count == 0 || r.End() < r.Start {
		return Range{}, corrupt("record: bad range %d+%d", r.Start, r.Count)
	}
	return r, nil
}

// DecodeJournal decodes a whole journal file image. It returns the header, the
// records, and the byte offset where the next record should be written. A
// damaged record is treated as the torn end of the journal only if everything
// after it is zero or also damaged in its last record position; a damaged
// record followed by valid ones is corruption.
func DecodeJournal(b []byte) (JournalHeader, []Range, int64, error) {
	h, err := DecodeJournalHeader(b)
	if err != nil {
		return h, nil, 0, err
	}
	var out []Range
	off := JournalHeaderSize
	for off+RecordSize <= len(b) {
		r, err := DecodeRecord(b[off:], h.Version)
		if errors.Is(err, ErrEnd) {
			break
		}
		if err != nil {
			// A torn write can only damage the last record written: if any
			// valid record follows, the damage is not a torn tail.
			for next := off + RecordSize; next+RecordSize <= len(b); next += RecordSize {
				if _, err2 := DecodeRecord(b[next:], h.Version); err2 == nil {
					return h, nil, 0, corrupt("journal: damaged record at %d before valid records", off)
				}
			}
			break
		}
		out = append(out, r)
		off += RecordSize
	}
	return h, out, int64(off), nil
}

// HasValidRecord reports whether any valid record of either version
// appears in a journal image at a record position, whatever state the
// header is in.
func HasValidRecord(b []byte) bool {
	for off := JournalHeaderSize; off+RecordSize <= len(b); off += RecordSize {
		for _, v := range []uint16{JournalIdentity, JournalDense} {
			if _, err := DecodeRecord(b[off:], v); err == nil {
				return true
			}
		}
	}
	return false
}
