package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestKillVerifiers: the kill test's content checks accept what the
// writer may leave and catch a lost, stale or torn write.
func TestKillVerifiers(t *testing.T) {
	const n, tag = 8, 77
	dir := t.TempDir()
	dev := filepath.Join(dir, "dev")
	img := make([]byte, n*blockSize)
	// Writes 0..11 over 8 blocks; 11 is acknowledged, 12 in flight.
	for seq := int64(0); seq <= 12; seq++ {
		fillBlock(img[(seq%n)*blockSize:(seq%n+1)*blockSize], seq, tag)
	}
	write := func(b []byte) {
		if err := os.WriteFile(dev, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(img)
	if err := checkBlocks(dev, n, 11, 12, tag); err != nil {
		t.Errorf("all acknowledged writes present: %v", err)
	}
	bad := func(what string, mutate func(b []byte)) {
		b := append([]byte(nil), img...)
		mutate(b)
		write(b)
		if err := checkBlocks(dev, n, 11, 12, tag); err == nil {
			t.Errorf("%s: checkBlocks found nothing", what)
		}
	}
	bad("lost write", func(b []byte) { clear(b[3*blockSize : 4*blockSize]) })
	bad("stale write", func(b []byte) { fillBlock(b[3*blockSize:4*blockSize], 3, tag) })
	bad("torn write", func(b []byte) { b[5*blockSize+100] ^= 1 })
	bad("other writer", func(b []byte) { fillBlock(b[2*blockSize:3*blockSize], 10, tag+1) })

	log := filepath.Join(dir, "log")
	recs := make([]byte, 5*recordSize)
	for seq := range int64(5) {
		fillRecord(recs[seq*recordSize:(seq+1)*recordSize], seq, tag)
	}
	os.WriteFile(log, recs[:4*recordSize+10], 0o600) // record 4 torn: not acked
	if err := checkRecords(log, 3, tag); err != nil {
		t.Errorf("records 0..3 present: %v", err)
	}
	if err := checkRecords(log, 4, tag); err == nil || !strings.Contains(err.Error(), "whole records") {
		t.Errorf("record 4 acknowledged but torn: %v", err)
	}
	recs[recordSize+9] ^= 1
	os.WriteFile(log, recs, 0o600)
	if err := checkRecords(log, 4, tag); err == nil {
		t.Error("a changed record: checkRecords found nothing")
	}
}
