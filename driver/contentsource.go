package driver

import (
	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// contentSourceIDs returns the snapshot or volume ID a new volume is made
// from, if any, without looking it up: an ID that cannot exist is NotFound.
func contentSourceIDs(src *csi.VolumeContentSource) (srcSnap, srcVol string, err error) {
	switch {
	case src == nil:
	case src.GetSnapshot() != nil:
		srcSnap = src.GetSnapshot().GetSnapshotId()
		if err := checkID("source snapshot ID", srcSnap); err != nil {
			return "", "", status.Errorf(codes.NotFound, "source snapshot %q not found", srcSnap)
		}
	case src.GetVolume() != nil:
		srcVol = src.GetVolume().GetVolumeId()
		if err := checkID("source volume ID", srcVol); err != nil {
			return "", "", status.Errorf(codes.NotFound, "source volume %q not found", srcVol)
		}
	default:
		return "", "", status.Error(codes.InvalidArgument, "unsupported volume_content_source")
	}
	return srcSnap, srcVol, nil
}

// sourceSize looks up the source snapshot or volume of a new volume and
// returns its size (0 without a source).
func (c *controllerService) sourceSize(srcSnap, srcVol string) (int64, error) {
	switch {
	case srcSnap != "":
		info, err := c.engine().GetSnapshot(srcSnap)
		if err != nil {
			return 0, toStatus(rpcCreateVolume, err)
		}
		return info.Size, nil
	case srcVol != "":
		info, err := c.engine().GetVolume(srcVol)
		if err != nil {
			return 0, toStatus(rpcCreateVolume, err)
		}
		return info.Size, nil
	}
	return 0, nil
}
