// Package ondisk holds cowcsi's on-disk formats: the catalog log frames and
// records, and the per-layer extent-map journal. Everything is little-endian,
// versioned and CRC32C-checksummed; nothing is cast with unsafe. Decoders
// return errors wrapping ErrCorrupt (damaged bytes) or ErrVersion (a format
// this build does not know), never panic, and are fuzzed.
package ondisk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
)

var (
	// ErrCorrupt reports bytes that fail validation (bad magic, length or checksum).
	ErrCorrupt = errors.New("corrupt on-disk data")
	// ErrVersion reports a well-formed header of an unknown format version.
	ErrVersion = errors.New("unsupported on-disk format version")
	// ErrEnd reports the zero-filled, never-written tail of a preallocated file.
	ErrEnd = errors.New("end of log")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Checksum is CRC32C, the checksum used by every structure in this package.
func Checksum(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

func corrupt(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrCorrupt, fmt.Sprintf(format, args...))
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

var le = binary.LittleEndian
