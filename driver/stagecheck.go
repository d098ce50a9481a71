package driver

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"github.com/cowcsi/cowcsi/cow"
)

// A stage or unstage that fails half-way can leave a volume's attachment
// broken: a name in the FUSE export serving a closed engine handle, a loop
// device bound to it, or a staged record whose loop device is gone. A later
// NodeStageVolume finds such state and repairs it instead of failing for
// good or answering OK over a device on which every I/O fails.

// clearLeftovers removes what an earlier failed stage or unstage of id left
// in this instance's export: loop devices still bound to the volume's file,
// then the file. Callers hold the volume's in-flight slot and have no live
// attachment for id, so anything found there is a leftover.
func (n *nodeService) clearLeftovers(ctx context.Context, id string) error {
	file := n.filePath(id)
	devs, err := n.loop().FindByBacking(file)
	if err != nil {
		klog.ErrorS(err, "Looking for leftover loop devices", "volume", id, "file", file)
	}
	for _, dev := range devs {
		// A device that stays bound keeps the file busy, and removeFile
		// reports that; one bound to a dead mount's file of that name (a
		// restart) does not matter.
		if err := n.loop().Detach(ctx, dev, file); err != nil {
			klog.ErrorS(err, "Detaching a leftover loop device", "volume", id, "device", dev)
			continue
		}
		klog.InfoS("Detached a loop device left by a failed stage or unstage", "volume", id, "device", dev)
	}
	return n.removeFile(id)
}

// attachmentProblem says what is wrong with a staged volume's attachment,
// or "" if nothing is: its engine handle must be open and its loop device
// bound to its FUSE file. It reads only the engine handle and sysfs, never
// through the FUSE file (a read there would block on this process).
func (n *nodeService) attachmentProblem(sv *stagedVolume) string {
	vol := n.openVolume(sv.VolumeID)
	if vol == nil {
		return "no open engine volume"
	}
	var b [cow.BlockSize]byte
	if _, err := vol.ReadAt(b[:min(int64(len(b)), vol.Size())], 0); errors.Is(err, cow.ErrClosed) {
		return "engine volume closed"
	}
	if sv.LoopDevice == "" {
		return "no loop device"
	}
	devs, err := n.loop().FindByBacking(n.filePath(sv.VolumeID))
	if err != nil {
		// Cannot tell: leave a possibly healthy volume alone.
		klog.ErrorS(err, "Checking a staged volume's loop device", "volume", sv.VolumeID, "device", sv.LoopDevice)
		return ""
	}
	if !slices.Contains(devs, sv.LoopDevice) {
		return fmt.Sprintf("loop device %s not bound to the volume's file", sv.LoopDevice)
	}
	return ""
}

// repairStaged tears down what is left of sv's broken attachment and
// attaches (and for a filesystem volume mounts) it again. Published
// targets would still hold the old device, so none may be mounted.
func (n *nodeService) repairStaged(ctx context.Context, sv *stagedVolume, problem string) error {
	for t := range sv.Targets {
		if mounted, _ := n.isMounted(t); mounted {
			return status.Errorf(codes.FailedPrecondition,
				"volume %s is staged with a broken device (%s) and still published at %s: unpublish it first", sv.VolumeID, problem, t)
		}
	}
	klog.InfoS("Repairing a broken staged volume", "volume", sv.VolumeID, "problem", problem, "device", sv.LoopDevice)
	if err := n.unmountStaging(sv); err != nil {
		return err
	}
	if err := n.detach(ctx, sv, n.openVolume(sv.VolumeID)); err != nil {
		klog.InfoS("Tearing down a broken staged volume left something behind", "volume", sv.VolumeID, "err", err)
	}
	sv.LoopDevice = ""
	n.forgetOpen(sv.VolumeID)
	vol, err := n.attach(ctx, sv)
	if err == nil && sv.AccessType == accessMount {
		if err = n.mountStaging(sv); err != nil {
			n.detach(ctx, sv, vol)
			sv.LoopDevice = ""
		}
	}
	if err != nil {
		// Keep the record (the CO unstages or stages again), without
		// the device that is no longer ours.
		return errors.Join(err, n.put(sv.VolumeID, sv, nil))
	}
	return n.put(sv.VolumeID, sv, vol)
}

// forgetOpen drops the engine handle recorded for id.
func (n *nodeService) forgetOpen(id string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	delete(n.open, id)
}
