package driver

import (
	"context"

	mount "k8s.io/mount-utils"

	"github.com/cowcsi/cowcsi/cow"
	"github.com/cowcsi/cowcsi/cow/fusefs"
)

// Engine is what the driver uses of the storage engine (*cow.Store, through
// engineAdapter).
type Engine interface {
	CreateVolume(ctx context.Context, spec cow.VolumeSpec) (cow.VolumeInfo, error)
	DeleteVolume(ctx context.Context, id string) error
	ExpandVolume(ctx context.Context, id string, size int64) (cow.VolumeInfo, error)
	GetVolume(id string) (cow.VolumeInfo, error)
	ListVolumes() []cow.VolumeInfo
	CreateSnapshot(ctx context.Context, spec cow.SnapshotSpec) (cow.SnapshotInfo, error)
	DeleteSnapshot(ctx context.Context, id string) error
	GetSnapshot(id string) (cow.SnapshotInfo, error)
	ListSnapshots() []cow.SnapshotInfo
	Capacity() (total, free int64, err error)
	OpenVolume(ctx context.Context, id string) (OpenVolume, error)
	Close() error
}

// BlockFile is the byte-addressed view of a volume that the FUSE file
// serves; *cow.Volume implements it. It is fusefs's own interface, so that
// what FileExport takes is what the filesystem serves.
type BlockFile = fusefs.BlockFile

// OpenVolume is an engine volume opened for I/O by NodeStageVolume.
type OpenVolume interface {
	BlockFile
	Close() error
}

// FileExport serves open volumes as files in the driver's FUSE filesystem,
// so that a loop device can be attached to them.
type FileExport interface {
	Add(name string, f BlockFile, readOnly bool) error
	// Remove fails wrapping errExportBusy while the file is open.
	Remove(name string) error
	// Resized tells the kernel that the file's size changed.
	Resized(name string) error
	Path(name string) string
	Unmount() error
}

// LoopDevices attaches loop devices to files. Device paths are /dev/loopN.
type LoopDevices interface {
	// Attach binds a free loop device to backing, with 4096-byte logical
	// blocks and direct I/O when the kernel accepts it.
	Attach(ctx context.Context, backing string, readOnly bool) (dev string, err error)
	// Detach unbinds dev if it is still bound to backing; a device that is
	// gone or bound to another file is left alone and is not an error.
	Detach(ctx context.Context, dev, backing string) error
	// Resize makes dev pick up the backing file's new size.
	Resize(ctx context.Context, dev string) error
	// Sync flushes dev down to its backing file and fsyncs that file.
	Sync(ctx context.Context, dev string) error
	// BackingFile returns the file dev is bound to; an error if unbound.
	BackingFile(dev string) (string, error)
	// FindByBacking lists the devices bound to backing.
	FindByBacking(backing string) ([]string, error)
}

// Mounter mounts and formats; *mount.SafeFormatAndMount implements it.
type Mounter interface {
	mount.Interface
	FormatAndMount(source, target, fstype string, options []string) error
}

// FSResizer grows a mounted filesystem to its device's size;
// *mount.ResizeFs implements it.
type FSResizer interface {
	Resize(devicePath, deviceMountPath string) (bool, error)
}

// Deps are the driver's dependencies on the engine and the kernel. Tests
// replace single fields; DefaultDeps wires the real ones.
type Deps struct {
	// OpenEngine opens the store in dir.
	OpenEngine func(dir string) (Engine, error)
	// MountExport mounts the driver's FUSE filesystem at dir; ioURing is
	// Options.FuseIOURing.
	MountExport func(ctx context.Context, dir, ioURing string) (FileExport, error)
	Loop        LoopDevices
	Mounter     Mounter
	Resizer     FSResizer
}

// engineAdapter turns *cow.Store into an Engine: the only difference is
// that OpenVolume returns an interface.
type engineAdapter struct{ *cow.Store }

func (e engineAdapter) OpenVolume(ctx context.Context, id string) (OpenVolume, error) {
	v, err := e.Store.OpenVolume(ctx, id)
	if err != nil {
		return nil, err
	}
	return v, nil
}

// OpenCowEngine opens the cow store in dir.
func OpenCowEngine(dir string) (Engine, error) {
	s, err := cow.Open(dir, cow.Options{})
	if err != nil {
		return nil, err
	}
	return engineAdapter{s}, nil
}
