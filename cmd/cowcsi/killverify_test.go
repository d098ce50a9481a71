package main

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// problems collects the first few findings of a check and counts the rest.
type problems struct {
	first []string
	n     int
}

func (p *problems) add(format string, a ...any) {
	p.n++
	if len(p.first) < 5 {
		p.first = append(p.first, fmt.Sprintf(format, a...))
	}
}

func (p *problems) err(what string) error {
	if p.n == 0 {
		return nil
	}
	return fmt.Errorf("%s: %d problem(s), first: %s", what, p.n, strings.Join(p.first, "; "))
}

// lastWriteTo is the largest sequence number <= upto that the writer
// wrote to block b (it writes seq to block seq mod n), or -1.
func lastWriteTo(b, n, upto int64) int64 {
	if upto < b {
		return -1
	}
	return b + (upto-b)/n*n
}

// checkBlocks reads the first nblocks blocks of dev and checks them against
// the writer's sequence: block b must hold, intact, the last write to it
// acknowledged at lo or a later write, up to hi (the largest number the
// writer may have issued); a block never written by lo may also be zero.
func checkBlocks(dev string, nblocks, lo, hi int64, tag uint64) error {
	fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", dev, err)
	}
	defer unix.Close(fd)
	const chunk = 256
	buf := alignedBlock(chunk * blockSize)
	want := make([]byte, blockSize)
	var p problems
	for first := int64(0); first < nblocks; first += chunk {
		n := min(chunk, nblocks-first)
		if got, err := unix.Pread(fd, buf[:n*blockSize], first*blockSize); err != nil || int64(got) != n*blockSize {
			return fmt.Errorf("read %s at block %d: %d bytes, %v", dev, first, got, err)
		}
		for i := range n {
			checkBlock(&p, buf[i*blockSize:(i+1)*blockSize], want, first+i, nblocks, lo, hi, tag)
		}
	}
	return p.err(fmt.Sprintf("block volume %s (acked up to %d, issued up to %d)", dev, lo, hi))
}

func checkBlock(p *problems, got, want []byte, b, nblocks, lo, hi int64, tag uint64) {
	need := lastWriteTo(b, nblocks, lo)
	if isZero(got) {
		if need >= 0 {
			p.add("block %d is zero, want write %d", b, need)
		}
		return
	}
	seq := int64(binary.LittleEndian.Uint64(got[8:]))
	if string(got[:8]) != blockMagic || seq%nblocks != b || seq > hi || binary.LittleEndian.Uint64(got[16:]) != tag {
		p.add("block %d holds no write of this writer to it (header %q seq %d)", b, got[:8], seq)
		return
	}
	if seq < need {
		p.add("block %d holds write %d, want %d (acknowledged) or later", b, seq, need)
		return
	}
	fillBlock(want, seq, tag)
	if !bytes.Equal(got, want) {
		p.add("block %d: write %d is torn", b, seq)
	}
}

// checkRecords checks that the file holds records 0..lo, intact.
func checkRecords(path string, lo int64, tag uint64) error {
	data, err := os.ReadFile(path)
	if err != nil {
		if lo < 0 && os.IsNotExist(err) {
			return nil
		}
		return fmt.Errorf("read %s: %w", path, err)
	}
	var p problems
	if have := int64(len(data) / recordSize); have < lo+1 {
		p.add("%d whole records, want at least %d", have, lo+1)
	}
	want := make([]byte, recordSize)
	for seq := int64(0); seq <= lo && (seq+1)*recordSize <= int64(len(data)); seq++ {
		fillRecord(want, seq, tag)
		if got := data[seq*recordSize : (seq+1)*recordSize]; !bytes.Equal(got, want) {
			p.add("record %d differs (header %q)", seq, got[:8])
		}
	}
	return p.err(fmt.Sprintf("log file %s (acked up to record %d)", path, lo))
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
