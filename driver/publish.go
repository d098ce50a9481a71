package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
)

func (n *nodeService) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	id, target, staging := req.GetVolumeId(), req.GetTargetPath(), req.GetStagingTargetPath()
	if err := checkIDPath(id, "target_path", target); err != nil {
		return nil, err
	}
	spec, err := parseCapability(req.GetVolumeCapability())
	if err != nil {
		return nil, err
	}
	if err := checkPath("staging_target_path", staging); err != nil {
		return nil, err
	}
	sv, err := n.staged(rpcNodePublish, id, codes.FailedPrecondition)
	if err != nil {
		return nil, err
	}
	if sv.StagingPath != staging {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s is staged at %s, not %s", id, sv.StagingPath, staging)
	}
	if spec.access != sv.AccessType {
		return nil, status.Errorf(codes.InvalidArgument, "volume %s is staged as %s, cannot publish it as %s", id, sv.AccessType, spec.access)
	}
	readOnly := req.GetReadonly() || spec.readOnly || sv.ReadOnly
	if t, ok := sv.Targets[target]; ok {
		if t.ReadOnly != readOnly {
			return nil, status.Errorf(codes.AlreadyExists, "volume %s is published at %s with readonly=%v", id, target, t.ReadOnly)
		}
		if mounted, _ := n.isMounted(target); mounted {
			return &csi.NodePublishVolumeResponse{}, nil
		}
		// Recorded but gone (unmounted from outside): mount again.
	} else if len(sv.Targets) > 0 && (spec.mode == csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER ||
		csi.VolumeCapability_AccessMode_Mode(sv.AccessMode) == csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER) {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s has a single-writer access mode and is already published", id)
	}
	if err := n.bind(sv, target, readOnly); err != nil {
		return nil, toStatus(rpcNodePublish, err)
	}
	sv.Targets[target] = publishedTarget{ReadOnly: readOnly}
	if err := n.put(id, sv, nil); err != nil {
		n.unmountIfMounted(target)
		return nil, toStatus(rpcNodePublish, err)
	}
	return &csi.NodePublishVolumeResponse{}, nil
}

// bind mounts the staged volume at target: the staging mount for
// filesystem volumes, the loop device node (onto a file) for block volumes.
func (n *nodeService) bind(sv *stagedVolume, target string, readOnly bool) error {
	opts := []string{"bind"}
	if readOnly {
		opts = append(opts, "ro")
	}
	source := sv.StagingPath
	if sv.AccessType == accessBlock {
		source = sv.LoopDevice
		if err := os.MkdirAll(filepath.Dir(target), 0o750); err != nil {
			return err
		}
		f, err := os.OpenFile(target, os.O_CREATE|os.O_RDONLY, 0o640)
		if err != nil {
			return err
		}
		f.Close()
	} else if err := os.MkdirAll(target, 0o750); err != nil {
		return err
	}
	if err := n.mounter().Mount(source, target, "", opts); err != nil {
		return fmt.Errorf("bind mount %s at %s: %w", source, target, err)
	}
	return nil
}

func (n *nodeService) NodeUnpublishVolume(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	id, target := req.GetVolumeId(), req.GetTargetPath()
	if err := checkIDPath(id, "target_path", target); err != nil {
		return nil, err
	}
	sv := n.get(id)
	if sv == nil || !hasTarget(sv, target) {
		// Not published here by this volume. Never unmount what we did
		// not mount (the path may belong to another volume); remove only
		// a leftover empty directory or file.
		if mounted, err := n.isMounted(target); err == nil && !mounted {
			if err := os.Remove(target); err != nil && !errors.Is(err, os.ErrNotExist) {
				klog.InfoS("Leaving target path in place", "volume", id, "target", target, "err", err)
			}
		}
		return &csi.NodeUnpublishVolumeResponse{}, nil
	}
	if err := n.unmountIfMounted(target); err != nil {
		return nil, toStatus(rpcNodeUnpublish, err)
	}
	if err := os.Remove(target); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, toStatus(rpcNodeUnpublish, fmt.Errorf("remove target: %w", err))
	}
	delete(sv.Targets, target)
	if err := n.put(id, sv, nil); err != nil {
		return nil, toStatus(rpcNodeUnpublish, err)
	}
	return &csi.NodeUnpublishVolumeResponse{}, nil
}

func hasTarget(sv *stagedVolume, p string) bool {
	_, ok := sv.Targets[p]
	return ok
}

// staged returns the volume id staged on this node. For one that is not:
// the engine's error when the volume does not exist, else notStaged.
func (n *nodeService) staged(call rpc, id string, notStaged codes.Code) (*stagedVolume, error) {
	sv := n.get(id)
	if sv == nil {
		if _, err := n.engine().GetVolume(id); err != nil {
			return nil, toStatus(call, err)
		}
		return nil, status.Errorf(notStaged, "volume %s is not staged on this node", id)
	}
	return sv, nil
}

// volumeAt finds the staged volume id and checks that p is its staging
// path or one of its targets; NotFound otherwise (the spec's code for "the
// volume does not exist at that path").
func (n *nodeService) volumeAt(call rpc, id, p string) (*stagedVolume, error) {
	sv, err := n.staged(call, id, codes.NotFound)
	if err != nil {
		return nil, err
	}
	if p != sv.StagingPath && !hasTarget(sv, p) {
		return nil, status.Errorf(codes.NotFound, "volume %s is not staged or published at %q", id, p)
	}
	return sv, nil
}
