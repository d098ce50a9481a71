package driver

import (
	"context"
	"errors"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cowcsi/cowcsi/cow"
)

// rpc names the CSI call an error comes from: the CSI spec maps the same
// condition to different codes depending on the call.
type rpc string

const (
	rpcCreateVolume     rpc = "CreateVolume"
	rpcDeleteVolume     rpc = "DeleteVolume"
	rpcCreateSnapshot   rpc = "CreateSnapshot"
	rpcDeleteSnapshot   rpc = "DeleteSnapshot"
	rpcGetCapacity      rpc = "GetCapacity"
	rpcListVolumes      rpc = "ListVolumes"
	rpcListSnapshots    rpc = "ListSnapshots"
	rpcValidateCaps     rpc = "ValidateVolumeCapabilities"
	rpcGetSnapshot      rpc = "GetSnapshot"
	rpcNodeStage        rpc = "NodeStageVolume"
	rpcNodeUnstage      rpc = "NodeUnstageVolume"
	rpcNodePublish      rpc = "NodePublishVolume"
	rpcNodeUnpublish    rpc = "NodeUnpublishVolume"
	rpcNodeExpand       rpc = "NodeExpandVolume"
	rpcNodeStats        rpc = "NodeGetVolumeStats"
	rpcNodeVolumeHealth rpc = "NodeGetVolumeHealth"
	rpcRecover          rpc = "recover"
)

// errExportBusy is returned when a volume's FUSE file is still held open
// (by a loop device the kernel has not released yet).
var errExportBusy = errors.New("volume file still open")

// toStatus is the one place where engine and node errors become gRPC
// status codes, following the error tables of the CSI spec for each RPC.
// A status error passes through unchanged.
func toStatus(call rpc, err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	var code codes.Code
	switch {
	case errors.Is(err, errFreezePending):
		// The spec's "operation pending for the volume".
		code = codes.Aborted
	case errors.Is(err, errStagingNotMounted):
		// The volume is staged here but its filesystem is not where it
		// was mounted: a snapshot cannot be consistent until it is
		// staged again.
		code = codes.FailedPrecondition
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	case errors.Is(err, cow.ErrNotFound):
		code = codes.NotFound
	case errors.Is(err, cow.ErrExists):
		code = codes.AlreadyExists
	case errors.Is(err, cow.ErrInvalid):
		// CreateVolume and the expand calls list "unsupported capacity"
		// as OUT_OF_RANGE; everywhere else a bad argument is
		// INVALID_ARGUMENT.
		switch call {
		case rpcCreateVolume, rpcNodeExpand:
			code = codes.OutOfRange
		default:
			code = codes.InvalidArgument
		}
	case errors.Is(err, cow.ErrNoSpace):
		// "Unable to provision in the capacity" / "not enough space to
		// create snapshot": RESOURCE_EXHAUSTED.
		code = codes.ResourceExhausted
	case errors.Is(err, cow.ErrInUse), errors.Is(err, errExportBusy):
		// The spec's answer to "volume in use" (DeleteVolume of an open
		// volume, staging a volume open elsewhere) is FAILED_PRECONDITION.
		code = codes.FailedPrecondition
	case errors.Is(err, cow.ErrClosed):
		// The store is shutting down: retry later (on the new instance).
		code = codes.Unavailable
	case errors.Is(err, cow.ErrCorrupt):
		code = codes.DataLoss
	default:
		code = codes.Internal
	}
	return status.Errorf(code, "%s: %v", call, err)
}
