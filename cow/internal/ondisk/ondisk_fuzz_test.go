package ondisk

import (
	"bytes"
	"errors"
	"reflect"
	"testing"
)

func sampleOps() []Op {
	return []Op{
		{Kind: OpPutLayer, Layer: &LayerRec{Num: 7, Parent: 3, Size: 1 << 30, Frozen: true}},
		{Kind: OpPutVolume, Volume: &VolumeRec{ID: "vol-1", Size: 1 << 30, Head: 8, SourceSnapshot: "s",
			Labels: map[string]string{"csi.name": "pvc-1", "fs": "ext4"}, Created: 42}},
		{Kind: OpPutSnapshot, Snapshot: &SnapshotRec{ID: "snap-1", VolumeID: "vol-1", Layer: 7, Size: 1 << 30, Created: 43}},
		{Kind: OpDelVolume, ID: "vol-0"},
		{Kind: OpDelSnapshot, ID: "snap-0"},
		{Kind: OpDelLayer, Num: 2},
	}
}

func TestFrameRoundTrip(t *testing.T) {
	ops := sampleOps()
	b := EncodeFrame(FrameTxn, ops)
	kind, got, n, err := DecodeFrame(append(b, make([]byte, 64)...))
	if err != nil || kind != FrameTxn || n != len(b) {
		t.Fatalf("decode: kind %v n %d/%d err %v", kind, n, len(b), err)
	}
	if !reflect.DeepEqual(got, ops) {
		t.Fatalf("round trip mismatch:\n got %+v\nwant %+v", got, ops)
	}
	// Every single-byte corruption is detected.
	for i := range b {
		c := bytes.Clone(b)
		c[i] ^= 0x40
		if _, _, _, err := DecodeFrame(c); err == nil {
			t.Fatalf("corruption at byte %d not detected", i)
		}
	}
	if _, _, _, err := DecodeFrame(make([]byte, 100)); !errors.Is(err, ErrEnd) {
		t.Fatalf("zero tail: got %v, want ErrEnd", err)
	}
}

func TestJournalRoundTrip(t *testing.T) {
	img := EncodeJournalHeader(JournalHeader{Layer: 9})
	want := []Range{{0, 1}, {100, 256}, {1 << 40, 3}}
	for _, r := range want {
		img = EncodeRecord(img, r)
	}
	img = append(img, make([]byte, 4*RecordSize)...)
	h, got, next, err := DecodeJournal(img)
	if err != nil || h.Layer != 9 || !reflect.DeepEqual(got, want) || next != int64(JournalHeaderSize+3*RecordSize) {
		t.Fatalf("got %v %v %d %v", h, got, next, err)
	}
	// A torn last record is dropped; the write position points at it.
	torn := bytes.Clone(img)
	torn[JournalHeaderSize+2*RecordSize+10] ^= 1
	_, got, next, err = DecodeJournal(torn)
	if err != nil || len(got) != 2 || next != int64(JournalHeaderSize+2*RecordSize) {
		t.Fatalf("torn tail: %v %d %v", got, next, err)
	}
	// Damage before a valid record is corruption, not a torn tail.
	mid := bytes.Clone(img)
	mid[JournalHeaderSize+10] ^= 1
	if _, _, _, err := DecodeJournal(mid); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("mid damage: got %v, want ErrCorrupt", err)
	}
}

func FuzzDecodeFrame(f *testing.F) {
	f.Add(EncodeFrame(FrameTxn, sampleOps()))
	f.Add(EncodeFrame(FrameCheckpoint, nil))
	f.Add([]byte{})
	f.Add(make([]byte, 32))
	f.Fuzz(func(t *testing.T, b []byte) {
		kind, ops, n, err := DecodeFrame(b)
		if err != nil {
			return
		}
		if n > len(b) {
			t.Fatalf("length %d beyond input %d", n, len(b))
		}
		// Whatever decodes must re-encode to the same bytes (canonical form).
		if again := EncodeFrame(kind, ops); !bytes.Equal(again, b[:n]) {
			// Labels with duplicate keys decode to fewer entries; that is the
			// only non-canonical case and must still decode the same way.
			k2, ops2, _, err := DecodeFrame(again)
			if err != nil || k2 != kind || !reflect.DeepEqual(ops2, ops) {
				t.Fatalf("re-encode differs and does not round trip: %v", err)
			}
		}
	})
}

func FuzzDecodeJournal(f *testing.F) {
	img := EncodeJournalHeader(JournalHeader{Layer: 1})
	img = EncodeRecord(img, Range{5, 10})
	f.Add(img)
	f.Add(append(img, make([]byte, 64)...))
	f.Add([]byte("CWM1"))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, ranges, next, err := DecodeJournal(b)
		if err != nil {
			return
		}
		if next < JournalHeaderSize || next > int64(len(b)) {
			t.Fatalf("next offset %d out of [%d,%d]", next, JournalHeaderSize, len(b))
		}
		for _, r := range ranges {
			if r.Count == 0 || r.End() < r.Start {
				t.Fatalf("invalid range %+v accepted", r)
			}
		}
	})
}
