package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/cowcsi/cowcsi/driver/internal/fsop"
)

// start brings the node side up: it reads what was staged before, tears
// down the kernel objects the previous instance left (their FUSE server is
// gone, so they can only fail), mounts a fresh FUSE filesystem and stages
// and publishes every recorded volume again at the same paths.
//
// Tearing down and redoing is the one recovery path for every way the
// previous instance ended (graceful stop, crash, node reboot): the old
// loop devices point at files of a dead FUSE connection and cannot be
// revived, and users of the old mounts get I/O errors either way.
//
// Driver.start has thawed what the previous instance left frozen first.
func (n *nodeService) start(ctx context.Context) error {
	vols, err := n.state.load()
	if err != nil {
		return fmt.Errorf("load node state: %w", err)
	}
	fuseDir := n.d.opts.fuseDir()
	for _, sv := range vols {
		n.teardownStale(ctx, fuseDir, sv)
	}
	exp, err := n.d.deps.MountExport(ctx, fuseDir, n.d.opts.FuseIOURing)
	if err != nil {
		return fmt.Errorf("mount FUSE filesystem at %s: %w", fuseDir, err)
	}
	n.export = exp

	for id, sv := range vols {
		vol, err := n.restage(ctx, sv)
		if err != nil {
			klog.ErrorS(err, "Cannot recover staged volume; forgetting it (the CO will stage it again)", "volume", id, "staging", sv.StagingPath)
			delete(vols, id)
			continue
		}
		n.open[id] = vol
		klog.InfoS("Recovered staged volume", "volume", id, "staging", sv.StagingPath, "device", sv.LoopDevice, "targets", len(sv.Targets))
	}
	n.mu.Lock()
	n.vols = vols
	n.loaded = true
	err = n.state.save(n.vols)
	n.mu.Unlock()
	if err != nil {
		return fmt.Errorf("save node state: %w", err)
	}
	return nil
}

// teardownStale removes what a previous instance left for sv: bind mounts,
// the staging mount (lazily: users may still hold files open) and the old
// loop device, if it is still bound to that volume's FUSE file.
func (n *nodeService) teardownStale(ctx context.Context, fuseDir string, sv *stagedVolume) {
	for t := range sv.Targets {
		detachMounts(t)
	}
	if sv.AccessType == accessMount {
		detachMounts(sv.StagingPath)
	}
	file := filepath.Join(fuseDir, sv.VolumeID)
	devs, err := n.loop().FindByBacking(file)
	if err != nil {
		klog.ErrorS(err, "Looking for stale loop devices", "volume", sv.VolumeID, "file", file)
	}
	if sv.LoopDevice != "" {
		// The old FUSE mount may be detached already (graceful stop), so
		// the kernel no longer names the backing file by its full path;
		// the recorded device is ours if it still ends in the volume ID.
		b, err := n.loop().BackingFile(sv.LoopDevice)
		switch {
		case err != nil:
			klog.V(2).InfoS("Recorded loop device is gone", "volume", sv.VolumeID, "device", sv.LoopDevice, "err", err)
		case sameBacking(b, file):
			if !slices.Contains(devs, sv.LoopDevice) {
				devs = append(devs, sv.LoopDevice)
			}
		default:
			klog.V(2).InfoS("Recorded loop device now serves another file", "volume", sv.VolumeID, "device", sv.LoopDevice, "backing", b)
		}
	}
	for _, dev := range devs {
		if err := n.loop().Detach(ctx, dev, ""); err != nil {
			klog.ErrorS(err, "Detaching stale loop device", "volume", sv.VolumeID, "device", dev)
		} else {
			klog.InfoS("Detached stale loop device", "volume", sv.VolumeID, "device", dev)
		}
	}
	sv.LoopDevice = ""
}

// detachMounts lazily unmounts everything stacked at p.
func detachMounts(p string) {
	for range 8 {
		err := unix.Unmount(p, unix.MNT_DETACH)
		if err != nil {
			if !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
				klog.ErrorS(err, "Detaching stale mount", "path", p)
			}
			return
		}
	}
}

// restage attaches sv again and mounts its staging path and targets.
func (n *nodeService) restage(ctx context.Context, sv *stagedVolume) (OpenVolume, error) {
	vol, err := n.attach(ctx, sv)
	if err != nil {
		return nil, err
	}
	if sv.AccessType == accessMount {
		if err := n.mountStaging(sv); err != nil {
			n.detach(ctx, sv, vol)
			return nil, err
		}
	}
	for t, pt := range sv.Targets {
		if err := n.bind(sv, t, pt.ReadOnly); err != nil {
			// The staging is fine; the CO will publish again.
			klog.ErrorS(err, "Cannot re-publish volume", "volume", sv.VolumeID, "target", t)
			delete(sv.Targets, t)
		}
	}
	return vol, nil
}

// shutdown makes everything acknowledged durable: it syncs staged
// filesystems, flushes their loop devices down to the engine and flushes
// the engine volumes. Mounts and loop devices stay (see Driver.shutdown).
func (n *nodeService) shutdown() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	var errs []error
	for id, sv := range n.vols {
		if sv.AccessType == accessMount {
			// In a child, like every call that waits on this process's
			// own FUSE connection (package fsop).
			if err := fsop.SyncFS(context.Background(), sv.StagingPath); err != nil {
				errs = append(errs, fmt.Errorf("volume %s: %w", id, err))
			}
		}
		if sv.LoopDevice != "" {
			if err := n.loop().Sync(context.Background(), sv.LoopDevice); err != nil {
				errs = append(errs, fmt.Errorf("volume %s: %w", id, err))
			}
		}
		if vol := n.open[id]; vol != nil {
			if err := vol.Flush(); err != nil {
				errs = append(errs, fmt.Errorf("volume %s: flush: %w", id, err))
			}
		}
	}
	// A state this instance did not load (its start failed before) must
	// not overwrite the one on disk: that would forget every volume staged
	// there, for the next instance too.
	if n.loaded {
		if err := n.state.save(n.vols); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (n *nodeService) unmountExport() error {
	if n.export == nil {
		return nil
	}
	return n.export.Unmount()
}
