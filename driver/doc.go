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
// filesystem (FIFREEZE), flushes the loop device down to the engine, switches
// layers in the engine and always thaws (FITHAW). The snapshot parameter
// "cowcsi.io/freeze": "false" skips the freeze (the loop device is still
// flushed; data only in the page cache is then not in the snapshot). Block
// volumes get a flush: crash-consistent. Cloning a volume that is staged here
// goes through the same quiesce step.
//
// The freeze is held by a child process (see below), which first checks that
// the staging path is on the volume's loop device: with the staging mount
// missing, the path is a directory of the node's own filesystem, which is
// never frozen (FailedPrecondition). The whole frozen window (freeze, loop
// flush, the engine's cut) is bounded by --freeze-timeout: the child thaws by
// itself when it ends, however late its FIFREEZE completes, and a snapshot
// whose cut may have come after that thaw is deleted and fails
// (DeadlineExceeded). The driver knows its own freezes: a volume's next
// freeze waits until the previous child has exited (else Aborted), so EBUSY
// always means "frozen by someone else" (snapshotted as is, their thaw).
// Each freeze is recorded under <store-dir>/node/freezing/<volume> before the
// child starts and removed once it has exited having thawed; a killed child
// is thawed again from its record at once, and a restart thaws every record
// first thing, since unmounting does not thaw a frozen filesystem.
//
// # Calls that wait on the driver's own FUSE connection
//
// The driver serves the FUSE files under its loop devices, so a syscall that
// ends in a request to that filesystem (FIFREEZE and FITHAW on a staging
// mount, syncfs, fsync of a loop device, reading or stat-ing a volume file,
// opening it and LOOP_CONFIGURE in attach, the loop status that stats it,
// LOOP_CLR_FD waiting for in-flight I/O) is served by the same process. Once
// the server has read such a request, the calling thread waits
// uninterruptibly. If the process is SIGKILLed then, that thread keeps it
// from exiting: /dev/fuse is never closed, the kernel never aborts the
// connection, the request is never answered, and the node wedges (with FUSE
// over io_uring not even a fusectl abort freed it).
//
// So all of them run in a short-lived child process (package
// driver/internal/fsop): the running binary itself, started through
// /proc/self/exe with the request in an environment variable, which fsop's
// init recognises before main runs, so every binary that links the driver is
// its own helper. The child inherits nothing but its standard descriptors
// (everything else, /dev/fuse and the rings included, is close-on-exec;
// TestFrozenWindowBounded checks) and stops when its standard input ends: the
// driver closed it, or died. A killed driver then always exits, the kernel
// aborts its connection, and the child's call fails and lets it exit too. The
// cost is one exec per call (see docs/DECISIONS.md), paid by snapshots,
// stage, unstage, expansion, health checks and shutdown, none of which are on
// the I/O path. Mounting, formatting and growing filesystems already run as
// separate programs (mount, mkfs, resize2fs).
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
