package cow

import "time"

// VolumeSpec describes a volume to create. At most one of SourceSnapshot and
// SourceVolume is set.
type VolumeSpec struct {
	ID             string
	Size           int64 // bytes; rounded up to a multiple of BlockSize
	SourceSnapshot string
	SourceVolume   string
	// Labels are opaque key/values kept with the volume (the driver stores the
	// CSI name and parameters here for idempotency checks).
	Labels map[string]string
}

// VolumeInfo is a volume as the catalog knows it.
type VolumeInfo struct {
	ID             string
	Size           int64
	SourceSnapshot string
	SourceVolume   string
	Labels         map[string]string
	CreatedAt      time.Time
}

// SnapshotSpec describes a snapshot to create.
type SnapshotSpec struct {
	ID       string
	VolumeID string
	Labels   map[string]string
}

// SnapshotInfo is a snapshot as the catalog knows it.
type SnapshotInfo struct {
	ID        string
	VolumeID  string // the source volume (it may since have been deleted)
	Size      int64  // the source volume's size when the snapshot was taken
	Labels    map[string]string
	CreatedAt time.Time
}

// Usage reports space use of a volume or snapshot.
type Usage struct {
	Size      int64 // logical size
	Allocated int64 // bytes mapped in the object's chain (data or zero blocks)
	// Exclusive is the bytes held only by this snapshot's layer: what
	// deleting it would free (snapshots only).
	Exclusive int64
}

// Extent is a byte range of a volume.
type Extent struct {
	Offset int64
	Length int64
}
