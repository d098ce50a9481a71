package csimode

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

const (
	dataChunk = 1 << 20 // bytes per write call
	dataAlign = 4096    // O_DIRECT alignment of offsets, lengths and buffers
	dataFile  = "cowbench.data"
)

// writeData writes n bytes of incompressible data to a published volume and
// syncs it: to the block device at target with O_DIRECT and 4 KiB-aligned
// buffers (n is rounded up to 4 KiB), or to a file in the filesystem mounted
// at target, through the page cache as an application would, then fsync.
func writeData(ctx context.Context, target string, n int64, block bool, seed uint64) error {
	var f *os.File
	var err error
	if block {
		n = (n + dataAlign - 1) / dataAlign * dataAlign
		f, err = os.OpenFile(target, os.O_WRONLY|unix.O_DIRECT, 0)
	} else {
		f, err = os.OpenFile(filepath.Join(target, dataFile), os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	}
	if err != nil {
		return err
	}
	defer f.Close()
	// An anonymous mapping is page-aligned, as O_DIRECT wants.
	buf, err := unix.Mmap(-1, 0, dataChunk, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return fmt.Errorf("mmap a write buffer: %w", err)
	}
	defer unix.Munmap(buf)
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	rng := rand.NewChaCha8(key)
	for off := int64(0); off < n; off += dataChunk {
		if err := ctx.Err(); err != nil {
			return err
		}
		chunk := buf[:min(int64(dataChunk), n-off)]
		// Fresh random bytes for every chunk: no two blocks alike, so no
		// driver can deduplicate or compress the data away.
		_, _ = rng.Read(chunk)
		if _, err := f.WriteAt(chunk, off); err != nil {
			return fmt.Errorf("write at %d: %w", off, err)
		}
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("fsync: %w", err)
	}
	return f.Close()
}
