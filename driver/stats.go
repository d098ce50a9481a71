package driver

import (
	"context"
	"fmt"
	"os"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cowcsi/cowcsi/driver/internal/fsop"
)

func (n *nodeService) NodeGetVolumeStats(ctx context.Context, req *csi.NodeGetVolumeStatsRequest) (*csi.NodeGetVolumeStatsResponse, error) {
	if err := checkID("volume ID", req.GetVolumeId()); err != nil {
		return nil, err
	}
	if req.GetVolumePath() == "" {
		return nil, status.Error(codes.InvalidArgument, "volume_path is required")
	}
	sv, err := n.volumeAt(rpcNodeStats, req.GetVolumeId(), req.GetVolumePath())
	if err != nil {
		return nil, err
	}
	if sv.AccessType == accessBlock {
		vol := n.openVolume(sv.VolumeID)
		if vol == nil {
			return nil, status.Errorf(codes.Internal, "volume %s is staged but not open", sv.VolumeID)
		}
		return &csi.NodeGetVolumeStatsResponse{Usage: []*csi.VolumeUsage{{Unit: csi.VolumeUsage_BYTES, Total: vol.Size()}}}, nil
	}
	var st unix.Statfs_t
	if err := unix.Statfs(req.GetVolumePath(), &st); err != nil {
		return nil, toStatus(rpcNodeStats, fmt.Errorf("statfs %s: %w", req.GetVolumePath(), err))
	}
	bs := st.Bsize
	return &csi.NodeGetVolumeStatsResponse{Usage: []*csi.VolumeUsage{
		{
			Unit:      csi.VolumeUsage_BYTES,
			Total:     int64(st.Blocks) * bs,
			Available: int64(st.Bavail) * bs,
			Used:      int64(st.Blocks-st.Bfree) * bs,
		},
		{
			Unit:      csi.VolumeUsage_INODES,
			Total:     int64(st.Files),
			Available: int64(st.Ffree),
			Used:      int64(st.Files - st.Ffree),
		},
	}}, nil
}

// NodeGetVolumeHealth reports INACCESSIBLE when the kernel's path to the
// volume is broken: loop device gone or rebound, FUSE file unreadable,
// staging mount missing. (CSI 1.13's replacement of VolumeCondition.)
func (n *nodeService) NodeGetVolumeHealth(ctx context.Context, req *csi.NodeGetVolumeHealthRequest) (*csi.NodeGetVolumeHealthResponse, error) {
	id := req.GetVolumeId()
	if err := checkID("volume ID", id); err != nil {
		return nil, err
	}
	sv, err := n.staged(rpcNodeVolumeHealth, id, codes.NotFound)
	if err != nil {
		return nil, err
	}
	health := &csi.VolumeHealth{VolumeId: id}
	bad := func(reason, msg string) {
		health.HealthStatuses = append(health.HealthStatuses, &csi.VolumeHealth_VolumeHealthEntry{
			Status: csi.VolumeHealthErrorType_INACCESSIBLE, Reason: reason, Message: msg,
		})
	}
	file := n.filePath(id)
	if backing, err := n.loop().BackingFile(sv.LoopDevice); err != nil {
		bad("LoopDeviceGone", fmt.Sprintf("%s: %v", sv.LoopDevice, err))
	} else if backing != file {
		bad("LoopDeviceRebound", fmt.Sprintf("%s is bound to %s, not %s", sv.LoopDevice, backing, file))
	}
	if err := fsop.Probe(ctx, file); err != nil {
		bad("BackingFileUnreadable", err.Error())
	}
	if sv.AccessType == accessMount {
		if mounted, err := n.isMounted(sv.StagingPath); err != nil || !mounted {
			bad("StagingMountMissing", fmt.Sprintf("%s is not mounted (err %v)", sv.StagingPath, err))
		} else if _, err := os.Stat(sv.StagingPath); err != nil {
			bad("StagingMountBroken", err.Error())
		}
	}
	return &csi.NodeGetVolumeHealthResponse{VolumeHealth: health}, nil
}
