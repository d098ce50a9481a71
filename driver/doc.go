// Package driver implements the cowcsi CSI plugin: the Identity, Controller
// and Node services on top of the cow storage engine.
//
// # Shape
//
// One Driver holds the three services and the gRPC server. Every engine error
// becomes a gRPC status in exactly one place (errors.go). A per-ID in-flight
// set (lock.go) answers Aborted to a concurrent duplicate call on the same
// volume or snapshot; the services themselves know nothing about locking.
//
// # On-disk layout under --store-dir
//
//	<store-dir>/engine      the cow store (volumes, snapshots, layers)
//	<store-dir>/fuse        the driver's FUSE filesystem: one file per staged volume
//	                        (--fuse-dir overrides the location)
//	<store-dir>/node/state  what this node has staged and published, rewritten
//	                        atomically (temp file, fsync, rename, fsync dir)
//
// # Volume and snapshot IDs
//
// IDs are derived from the CSI names: "vol-" or "snap-" followed by the first
// 32 hex digits of sha256(name). A retried CreateVolume or CreateSnapshot maps
// to the same ID without any lookup table; the CSI name, a digest of the
// parameters, the requested size and the content source are kept in the
// engine's labels and compared on retry, so that the same name with different
// parameters is AlreadyExists.
//
// # Node side
//
// NodeStageVolume opens the engine volume, adds it as a file to the driver's
// FUSE filesystem and attaches a loop device (4096-byte logical blocks, direct
// I/O when the kernel accepts it) to that file. Filesystem volumes are then
// formatted when blank (ext4 by default, or xfs) and mounted at the staging
// path; block volumes mount nothing there and NodePublishVolume bind-mounts the
// loop device node onto the target file. What is staged and published is
// persisted, so a restarted driver can rebuild the FUSE file, the loop device,
// the staging mount and the bind mounts (recover.go).
//
// # Snapshot consistency
//
// CreateSnapshot of a volume that is mounted on this node freezes the staging
// filesystem (FIFREEZE, bounded by a timeout), flushes the loop device down to
// the engine, switches layers in the engine and always thaws (FITHAW). The
// snapshot parameter "cowcsi.io/freeze": "false" skips the freeze (the loop
// device is still flushed; data only in the page cache is then not in the
// snapshot). Block volumes get a flush: crash-consistent. Cloning a volume
// that is staged here goes through the same quiesce step.
//
// # Expansion: node only
//
// The driver offers the node EXPAND_VOLUME capability and ONLINE volume
// expansion, but NOT the controller EXPAND_VOLUME capability. Volumes are
// node-local and the controller service runs on every node (csi-provisioner
// and csi-snapshotter in --node-deployment mode), but csi-resizer has no
// node-deployment mode: a ControllerExpandVolume could be sent to the
// controller of whichever node runs the resizer, which does not hold the data.
// When a driver offers node expansion without controller expansion,
// external-resizer uses its "trivial resizer": it only marks the PV as resized,
// and the kubelet then calls NodeExpandVolume on the volume's own node. That
// call grows the engine volume (cow ExpandVolume works while the volume is
// open), tells the FUSE file its new size, makes the loop device pick it up
// (LOOP_SET_CAPACITY) and grows the filesystem (resize2fs or xfs_growfs via
// mount-utils' ResizeFs).
//
// csi-sanity runs its controller ExpandVolume specs only when the controller
// capability is present, so they are skipped; its node spec ("should work if
// node-expand is called after node-publish") exercises exactly this path. See
// SANITY.md.
//
// # Volume health
//
// CSI 1.13 replaced VolumeCondition in NodeGetVolumeStats with
// NodeGetVolumeHealth (node capability GET_VOLUME_HEALTH). It reports a volume
// as INACCESSIBLE when its loop device is gone or bound to something else, or
// its FUSE file cannot be read.
package driver
