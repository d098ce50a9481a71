package driver

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"sort"
	"strconv"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cowcsi/cowcsi/cow"
)

const (
	volumeIDPrefix   = "vol-"
	snapshotIDPrefix = "snap-"

	// maxNameLength bounds CSI names. The spec asks plugins to accept at
	// least 128 characters; Kubernetes names are far shorter. The name is
	// only hashed and kept as a label, so any content is safe.
	maxNameLength = 1024

	// Labels kept with every volume and snapshot the driver creates; they
	// are what a retried call is compared against.
	labelName          = "cowcsi.io/name"
	labelParameters    = "cowcsi.io/parameters-sha256"
	labelRequestedSize = "cowcsi.io/requested-size"
	labelSource        = "cowcsi.io/source"
)

// volumeIDFor derives the volume ID from the CSI name, so that a retried
// CreateVolume maps to the same ID without a lookup table.
func volumeIDFor(name string) string { return volumeIDPrefix + nameDigest(name) }

// snapshotIDFor derives the snapshot ID from the CSI name.
func snapshotIDFor(name string) string { return snapshotIDPrefix + nameDigest(name) }

func nameDigest(name string) string {
	sum := sha256.Sum256([]byte(name))
	return hex.EncodeToString(sum[:16])
}

// parametersDigest is an order-independent digest of a parameter map, kept
// as a label so that a retry with other parameters is detected.
func parametersDigest(params map[string]string) string {
	keys := make([]string, 0, len(params))
	for k := range params {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	h := sha256.New()
	var n [8]byte
	for _, k := range keys {
		// Length-prefixed, so that {"a":"bc"} and {"ab":"c"} differ.
		for _, s := range []string{k, params[k]} {
			binary.LittleEndian.PutUint64(n[:], uint64(len(s)))
			h.Write(n[:])
			h.Write([]byte(s))
		}
	}
	return hex.EncodeToString(h.Sum(nil))
}

// checkName validates a CSI name of a volume or snapshot.
func checkName(name string) error {
	switch {
	case name == "":
		return status.Error(codes.InvalidArgument, "name is required")
	case len(name) > maxNameLength:
		return status.Errorf(codes.InvalidArgument, "name is %d bytes, at most %d are accepted", len(name), maxNameLength)
	}
	return nil
}

// checkID validates a volume or snapshot ID that a caller hands back. IDs
// are used as file names in the store and in the FUSE filesystem, so
// anything that is not a well-formed engine ID ("../x", "a/b") is refused
// before it reaches a path.
func checkID(what, id string) error {
	if id == "" {
		return status.Errorf(codes.InvalidArgument, "%s is required", what)
	}
	if err := cow.ValidateID(id); err != nil {
		return status.Errorf(codes.InvalidArgument, "%s %q is malformed: %v", what, id, err)
	}
	return nil
}

const (
	mib = int64(1) << 20
	// maxVolumeSize bounds volume sizes (1 PiB); far beyond the sizes a
	// node-local volume has, and far from int64 overflow when rounding.
	maxVolumeSize = int64(1) << 50
)

func roundUp(n, to int64) int64 { return (n + to - 1) / to * to }

func formatSize(n int64) string { return strconv.FormatInt(n, 10) }
