package driver

import (
	"context"
	"fmt"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
)

func (n *nodeService) NodeExpandVolume(ctx context.Context, req *csi.NodeExpandVolumeRequest) (*csi.NodeExpandVolumeResponse, error) {
	id := req.GetVolumeId()
	if err := checkID("volume ID", id); err != nil {
		return nil, err
	}
	if req.GetVolumePath() == "" {
		return nil, status.Error(codes.InvalidArgument, "volume_path is required")
	}
	sv, err := n.volumeAt(rpcNodeExpand, id, req.GetVolumePath())
	if err != nil {
		return nil, err
	}
	if vc := req.GetVolumeCapability(); vc != nil {
		spec, err := parseCapability(vc)
		if err != nil {
			return nil, err
		}
		if spec.access != sv.AccessType {
			return nil, status.Errorf(codes.InvalidArgument, "volume %s is staged as %s, not %s", id, sv.AccessType, spec.access)
		}
	}
	vol := n.openVolume(id)
	if vol == nil {
		return nil, status.Errorf(codes.Internal, "volume %s is staged but not open", id)
	}
	required, limit := req.GetCapacityRange().GetRequiredBytes(), req.GetCapacityRange().GetLimitBytes()
	cur := vol.Size()
	switch {
	case required < 0 || limit < 0:
		return nil, status.Errorf(codes.InvalidArgument, "negative capacity range (required %d, limit %d)", required, limit)
	case limit > 0 && limit < required:
		return nil, status.Errorf(codes.OutOfRange, "limit_bytes %d is below required_bytes %d", limit, required)
	case limit > 0 && cur > limit:
		// Volumes never shrink.
		return nil, status.Errorf(codes.OutOfRange, "volume %s is %d bytes, more than limit_bytes %d: volumes cannot shrink", id, cur, limit)
	}
	size := cur
	if required > cur {
		// required <= cur is a retry of an expansion that already
		// happened (or a rounding difference): nothing to grow, but the
		// loop device and filesystem are still brought up to the size.
		if size, err = volumeSize(req.GetCapacityRange(), cur, cur); err != nil {
			return nil, err
		}
		if sv.ReadOnly {
			return nil, status.Errorf(codes.FailedPrecondition, "volume %s is staged read-only", id)
		}
		if _, err := n.engine().ExpandVolume(ctx, id, size); err != nil {
			return nil, toStatus(rpcNodeExpand, err)
		}
	}
	if err := n.export.Resized(id); err != nil {
		return nil, toStatus(rpcNodeExpand, fmt.Errorf("resize volume file: %w", err))
	}
	if err := n.loop().Resize(ctx, sv.LoopDevice); err != nil {
		return nil, toStatus(rpcNodeExpand, fmt.Errorf("resize loop device: %w", err))
	}
	if sv.AccessType == accessMount && !sv.ReadOnly {
		if _, err := n.d.deps.Resizer.Resize(sv.LoopDevice, sv.StagingPath); err != nil {
			return nil, toStatus(rpcNodeExpand, fmt.Errorf("grow filesystem: %w", err))
		}
	}
	klog.InfoS("Volume expanded", "volume", id, "size", size)
	return &csi.NodeExpandVolumeResponse{CapacityBytes: size}, nil
}
