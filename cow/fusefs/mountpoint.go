package fusefs

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// prepareMountpoint makes dir usable as a fresh mount point. A FUSE mount
// whose server died (a crashed driver) answers every access with ENOTCONN;
// it is detached lazily, so loop devices that still reference its files keep
// their (failing) references without blocking the new mount. Mounts can
// stack, so repeat until dir is reachable.
func prepareMountpoint(ctx context.Context, dir string) error {
	for range 8 {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("fusefs: mount %s: %w", dir, err)
		}
		var st unix.Stat_t
		err := unix.Stat(dir, &st)
		switch {
		case errors.Is(err, unix.ENOTCONN):
			if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
				return fmt.Errorf("fusefs: detach stale mount at %s: %w", dir, err)
			}
			continue
		case errors.Is(err, unix.ENOENT):
			if err := os.MkdirAll(dir, 0o700); err != nil {
				return fmt.Errorf("fusefs: %w", err)
			}
			continue
		case err != nil:
			return fmt.Errorf("fusefs: stat %s: %w", dir, err)
		case st.Mode&unix.S_IFMT != unix.S_IFDIR:
			return fmt.Errorf("fusefs: mount point %s is not a directory: %w", dir, unix.ENOTDIR)
		}
		mounted, err := mountinfo.Mounted(dir)
		if err != nil {
			return fmt.Errorf("fusefs: %w", err)
		}
		if mounted {
			// A live server (another instance of the driver?) is
			// mounted here; stacking on top of it would hide its files.
			return fmt.Errorf("fusefs: %s is already a mount point: %w", dir, unix.EBUSY)
		}
		return nil
	}
	return fmt.Errorf("fusefs: %s: stale mounts keep reappearing", dir)
}
