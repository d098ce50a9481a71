package ondisk

import (
	"errors"
	"fmt"
)

// The extent-map journal of one layer: a header, then fixed-size records
// "blocks [Start, Start+Count) are owned by this layer". Ownership within a
// layer only ever grows (a discard owns the block and punches a hole in the
// data file), so the journal is append-only and replay is a union. The file is
// preallocated with zeros; replay stops at the first all-zero record. A torn
// or damaged last record is an unacknowledged flush and is dropped.

const (
	journalMagic   = 0x314d5743 // "CWM1"
	recordMagic    = 0x31525743 // "CWR1"
	JournalVersion = 1
	// JournalHeaderSize and RecordSize are the fixed sizes of the header and of
	// one record. Both are 32 so records stay aligned.
	JournalHeaderSize = 32
	RecordSize        = 32
)

// JournalHeader identifies a layer's journal.
type JournalHeader struct {
	Layer uint32
}

// EncodeJournalHeader returns the 32-byte header.
func EncodeJournalHeader(h JournalHeader) []byte {
	b := make([]byte, JournalHeaderSize)
	le.PutUint32(b[0:], journalMagic)
	le.PutUint16(b[4:], JournalVersion)
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
	if v := le.Uint16(b[4:]); v != JournalVersion {
		return JournalHeader{}, fmt.Errorf("%w: journal version %d", ErrVersion, v)
	}
	return JournalHeader{Layer: le.Uint32(b[8:])}, nil
}

// Range is a run of blocks.
type Range struct {
	Start uint64
	Count uint64
}

// End is the first block after the range.
func (r Range) End() uint64 { return r.Start + r.Count }

// EncodeRecord appends one 32-byte record for r to dst.
func EncodeRecord(dst []byte, r Range) []byte {
	var b [RecordSize]byte
	le.PutUint32(b[0:], recordMagic)
	le.PutUint64(b[8:], r.Start)
	le.PutUint64(b[16:], r.Count)
	le.PutUint32(b[24:], Checksum(b[:24]))
	return append(dst, b[:]...)
}

// DecodeRecord decodes one record. It returns ErrEnd for an all-zero record
// (the unwritten, preallocated tail) and ErrCorrupt for anything damaged.
func DecodeRecord(b []byte) (Range, error) {
	if len(b) < RecordSize {
		return Range{}, corrupt("record: %d bytes", len(b))
	}
	b = b[:RecordSize]
	if allZero(b) {
		return Range{}, ErrEnd
	}
	if le.Uint32(b[0:]) != recordMagic || Checksum(b[:24]) != le.Uint32(b[24:]) {
		return Range{}, corrupt("record: bad magic or checksum")
	}
	r := Range{Start: le.Uint64(b[8:]), Count: le.Uint64(b[16:])}
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
		r, err := DecodeRecord(b[off:])
		if errors.Is(err, ErrEnd) {
			break
		}
		if err != nil {
			// A torn write can only damage the last record written: if any
			// valid record follows, the damage is not a torn tail.
			for next := off + RecordSize; next+RecordSize <= len(b); next += RecordSize {
				if _, err2 := DecodeRecord(b[next:]); err2 == nil {
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

// HasValidRecord reports whether any valid record appears in a journal image
// at a record position, whatever state the header is in.
func HasValidRecord(b []byte) bool {
	for off := JournalHeaderSize; off+RecordSize <= len(b); off += RecordSize {
		if _, err := DecodeRecord(b[off:]); err == nil {
			return true
		}
	}
	return false
}
