package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"runtime"
	"sync"
	"syscall"

	"k8s.io/klog/v2"
	"k8s.io/mount-utils"
	utilexec "k8s.io/utils/exec"

	"github.com/cowcsi/cowcsi/cow"
	"github.com/cowcsi/cowcsi/cow/fusefs"
	"github.com/cowcsi/cowcsi/driver/internal/fsop"
)

// fuseExport implements FileExport with cow/fusefs.
type fuseExport struct{ s *fusefs.Server }

var _ FileExport = fuseExport{}

// fusefs finds the engine's fast paths on a volume by type assertion: a
// method renamed or retyped in cow would silently send every request the
// slow way (no reads without waiting, no reads or writes through the FUSE
// ring). These fail the build instead. They live here, where the engine
// meets fusefs: fusefs serves any BlockFile and does not import cow.
var (
	_ fusefs.BlockFile    = (*cow.Volume)(nil)
	_ fusefs.NoWaitReader = (*cow.Volume)(nil)
	_ fusefs.ReadPlanner  = (*cow.Volume)(nil)
	_ fusefs.WritePlanner = (*cow.Volume)(nil)
)

// MountFuseExport mounts the driver's FUSE filesystem at dir. A stale mount
// left there by a crashed driver is detached first (fusefs.Mount does it).
// ioURing is Options.FuseIOURing: FUSE over io_uring is the default where
// the kernel has it (docs/DECISIONS.md, "FUSE over io_uring instead of /dev/fuse").
func MountFuseExport(ctx context.Context, dir, ioURing string) (FileExport, error) {
	opts := fusefs.Options{FsName: "cowcsi", Errno: engineErrno, IOURing: ioURing != FuseIOURingOff,
		// Resized's stat comes back to this server: a child makes it.
		StatSize: func(path string) (int64, error) { return fsop.StatSize(context.Background(), path) },
	}
	if opts.IOURing {
		// Only connections that ask for the ring (this one) are
		// affected by the parameter.
		if err := fusefs.EnableIOURing(); err != nil {
			if ioURing == FuseIOURingOn {
				return nil, err
			}
			klog.InfoS("FUSE over io_uring not available; serving through /dev/fuse", "reason", err.Error())
			opts.IOURing = false
		}
	}
	s, err := fusefs.Mount(ctx, dir, opts)
	if err != nil {
		return nil, err
	}
	if on, why := s.IOURing(); opts.IOURing && !on {
		if ioURing == FuseIOURingOn {
			_ = s.Unmount()
			return nil, fmt.Errorf("--fuse-io-uring=on: %w", why)
		}
		klog.InfoS("FUSE over io_uring not in use; serving through /dev/fuse", "reason", why.Error())
	} else if on {
		klog.InfoS("Serving the FUSE filesystem through FUSE over io_uring", "dir", dir)
		reserveProcs(s.RingQueues())
	}
	return fuseExport{s}, nil
}

// reserveProcs raises GOMAXPROCS, once per process, by the number of ring
// queues, unless the GOMAXPROCS environment variable set it. A queue's
// thread spends most of its time blocked in io_uring_enter, and a
// goroutine blocked in a syscall keeps its P until sysmon takes it back
// (from 20 µs, and sysmon sleeps longer when idle): with one P per CPU,
// busy queues left the rest of the process (the engine's goroutines,
// go-fuse's /dev/fuse readers, the garbage collector) waiting for sysmon
// (docs/DECISIONS.md, "GOMAXPROCS raised by the ring queue count").
// Setting GOMAXPROCS also stops the runtime from following a later change
// of the container's CPU limit (Go 1.25+).
func reserveProcs(queues int) {
	procsOnce.Do(func() {
		if os.Getenv("GOMAXPROCS") != "" {
			return
		}
		runtime.GOMAXPROCS(runtime.GOMAXPROCS(0) + queues)
	})
}

var procsOnce sync.Once

// engineErrno tells the kernel what an engine error means, so that a full
// store surfaces in the volume's filesystem as ENOSPC rather than EIO.
func engineErrno(err error) syscall.Errno {
	switch {
	case errors.Is(err, cow.ErrNoSpace):
		return syscall.ENOSPC
	case errors.Is(err, cow.ErrInvalid):
		return syscall.EINVAL
	case errors.Is(err, cow.ErrClosed):
		return syscall.EIO
	}
	return 0
}

func (e fuseExport) Add(name string, f BlockFile, readOnly bool) error {
	return e.s.Add(name, f, readOnly)
}

func (e fuseExport) Remove(name string) error {
	err := e.s.Remove(name)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case errors.Is(err, fusefs.ErrBusy):
		return fmt.Errorf("%w: %v", errExportBusy, err)
	}
	return err
}

func (e fuseExport) Resized(name string) error { return e.s.Resized(name) }
func (e fuseExport) Path(name string) string   { return e.s.Path(name) }
func (e fuseExport) Unmount() error            { return e.s.Unmount() }

// DefaultDeps wires the real engine, FUSE filesystem, loop devices,
// mounter and filesystem resizer.
func DefaultDeps() Deps {
	exec := utilexec.New()
	return Deps{
		OpenEngine:  OpenCowEngine,
		MountExport: MountFuseExport,
		Loop:        loopDevices{},
		// Without systemd: in a container systemd-run is not reachable,
		// and mounts must stay in the plugin's (shared) mount namespace.
		Mounter: mount.NewSafeFormatAndMount(mount.NewWithoutSystemd(""), exec),
		Resizer: mount.NewResizeFs(exec),
	}
}
