package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
	mount "k8s.io/mount-utils"
)

type nodeService struct {
	csi.UnimplementedNodeServer
	d     *Driver
	state stateFile

	// export is set by start, before the driver is ready.
	export FileExport

	// mu guards vols and open. Per-volume calls are already serialised
	// by the in-flight set; mu only protects the maps and the state file.
	mu   sync.Mutex
	vols map[string]*stagedVolume
	open map[string]OpenVolume
	// loaded: vols holds the recovered node state, which start has
	// saved; until then the state file is not this instance's to write.
	loaded bool
	// freezes are the volumes with a freeze under way (freeze.go).
	freezes freezeTracker
}

var _ csi.NodeServer = (*nodeService)(nil)

func newNodeService(d *Driver) *nodeService {
	return &nodeService{
		d:     d,
		state: stateFile{dir: d.opts.stateDir()},
		vols:  map[string]*stagedVolume{},
		open:  map[string]OpenVolume{},
	}
}

func (n *nodeService) engine() Engine            { return n.d.engine }
func (n *nodeService) loop() LoopDevices         { return n.d.deps.Loop }
func (n *nodeService) mounter() Mounter          { return n.d.deps.Mounter }
func (n *nodeService) filePath(id string) string { return n.export.Path(id) }

// get returns a copy of the staged record of id, or nil.
func (n *nodeService) get(id string) *stagedVolume {
	n.mu.Lock()
	defer n.mu.Unlock()
	sv := n.vols[id]
	if sv == nil {
		return nil
	}
	cp := *sv
	cp.Targets = make(map[string]publishedTarget, len(sv.Targets))
	for k, v := range sv.Targets {
		cp.Targets[k] = v
	}
	return &cp
}

func (n *nodeService) isStaged(id string) bool { return n.get(id) != nil }

// put records sv (nil: forgets id) and persists the state.
func (n *nodeService) put(id string, sv *stagedVolume, vol OpenVolume) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if sv == nil {
		delete(n.vols, id)
		delete(n.open, id)
	} else {
		n.vols[id] = sv
		if vol != nil {
			n.open[id] = vol
		}
	}
	if err := n.state.save(n.vols); err != nil {
		return fmt.Errorf("save node state: %w", err)
	}
	return nil
}

func (n *nodeService) openVolume(id string) OpenVolume {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.open[id]
}

func (n *nodeService) NodeGetCapabilities(ctx context.Context, req *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	var caps []*csi.NodeServiceCapability
	for _, t := range []csi.NodeServiceCapability_RPC_Type{
		csi.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME,
		csi.NodeServiceCapability_RPC_GET_VOLUME_STATS,
		csi.NodeServiceCapability_RPC_EXPAND_VOLUME,
		csi.NodeServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
		csi.NodeServiceCapability_RPC_GET_VOLUME_HEALTH,
	} {
		caps = append(caps, &csi.NodeServiceCapability{
			Type: &csi.NodeServiceCapability_Rpc{Rpc: &csi.NodeServiceCapability_RPC{Type: t}},
		})
	}
	return &csi.NodeGetCapabilitiesResponse{Capabilities: caps}, nil
}

func (n *nodeService) NodeGetInfo(ctx context.Context, req *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{
		NodeId:             n.d.opts.NodeID,
		MaxVolumesPerNode:  n.d.opts.MaxVolumesPerNode,
		AccessibleTopology: &csi.Topology{Segments: map[string]string{TopologyKey: n.d.opts.NodeID}},
	}, nil
}

// stageSpec is what NodeStageVolume derives from a volume capability.
type stageSpec struct {
	access     string
	fsType     string
	mountFlags []string
	mode       csi.VolumeCapability_AccessMode_Mode
	readOnly   bool
}

func parseCapability(vc *csi.VolumeCapability) (stageSpec, error) {
	if vc == nil {
		return stageSpec{}, status.Error(codes.InvalidArgument, "volume_capability is required")
	}
	if p := capabilityProblem(vc); p != "" {
		return stageSpec{}, status.Errorf(codes.InvalidArgument, "unsupported volume capability: %s", p)
	}
	s := stageSpec{mode: vc.GetAccessMode().GetMode()}
	s.readOnly = s.mode == csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY
	if vc.GetBlock() != nil {
		s.access = accessBlock
		return s, nil
	}
	s.access = accessMount
	s.fsType = vc.GetMount().GetFsType()
	if s.fsType == "" {
		s.fsType = "ext4"
	}
	s.mountFlags = vc.GetMount().GetMountFlags()
	return s, nil
}

// checkIDPath checks the volume ID of a node request and its path named
// what.
func checkIDPath(id, what, p string) error {
	if err := checkID("volume ID", id); err != nil {
		return err
	}
	return checkPath(what, p)
}

func checkPath(what, p string) error {
	if p == "" {
		return status.Errorf(codes.InvalidArgument, "%s is required", what)
	}
	if !filepath.IsAbs(p) || filepath.Clean(p) != p {
		return status.Errorf(codes.InvalidArgument, "%s %q must be a clean absolute path", what, p)
	}
	return nil
}

func (n *nodeService) NodeStageVolume(ctx context.Context, req *csi.NodeStageVolumeRequest) (*csi.NodeStageVolumeResponse, error) {
	id, staging := req.GetVolumeId(), req.GetStagingTargetPath()
	if err := checkIDPath(id, "staging_target_path", staging); err != nil {
		return nil, err
	}
	spec, err := parseCapability(req.GetVolumeCapability())
	if err != nil {
		return nil, err
	}

	if sv := n.get(id); sv != nil {
		if sv.StagingPath != staging {
			return nil, status.Errorf(codes.FailedPrecondition, "volume %s is already staged at %s", id, sv.StagingPath)
		}
		if sv.AccessType != spec.access || sv.FSType != spec.fsType || sv.ReadOnly != spec.readOnly {
			return nil, status.Errorf(codes.AlreadyExists, "volume %s is staged at %s with an incompatible capability (%s %s ro=%v)",
				id, staging, sv.AccessType, sv.FSType, sv.ReadOnly)
		}
		if sv.AccessType == accessMount {
			// Idempotent, but make sure the mount is really there.
			if mounted, _ := n.isMounted(staging); !mounted {
				if err := n.mountStaging(sv); err != nil {
					return nil, toStatus(rpcNodeStage, err)
				}
			}
		}
		return &csi.NodeStageVolumeResponse{}, nil
	}

	if _, err := n.engine().GetVolume(id); err != nil {
		return nil, toStatus(rpcNodeStage, err)
	}
	sv := &stagedVolume{
		VolumeID:    id,
		StagingPath: staging,
		AccessType:  spec.access,
		FSType:      spec.fsType,
		MountFlags:  spec.mountFlags,
		AccessMode:  int32(spec.mode),
		ReadOnly:    spec.readOnly,
		Targets:     map[string]publishedTarget{},
	}
	vol, err := n.attach(ctx, sv)
	if err != nil {
		return nil, toStatus(rpcNodeStage, err)
	}
	if sv.AccessType == accessMount {
		if err := n.mountStaging(sv); err != nil {
			n.detach(ctx, sv, vol)
			return nil, toStatus(rpcNodeStage, err)
		}
	}
	if err := n.put(id, sv, vol); err != nil {
		n.unmountStaging(sv)
		n.detach(ctx, sv, vol)
		n.put(id, nil, nil)
		return nil, toStatus(rpcNodeStage, err)
	}
	klog.InfoS("Volume staged", "volume", id, "staging", staging, "device", sv.LoopDevice, "access", sv.AccessType)
	return &csi.NodeStageVolumeResponse{}, nil
}

// attach opens the engine volume, serves it as a FUSE file and attaches a
// loop device to the file; it sets sv.LoopDevice. On error nothing is left.
func (n *nodeService) attach(ctx context.Context, sv *stagedVolume) (OpenVolume, error) {
	id := sv.VolumeID
	vol, err := n.engine().OpenVolume(ctx, id)
	if err != nil {
		return nil, err
	}
	if err := n.export.Add(id, vol, sv.ReadOnly); err != nil {
		vol.Close()
		return nil, fmt.Errorf("serve volume file: %w", err)
	}
	dev, err := n.loop().Attach(ctx, n.filePath(id), sv.ReadOnly)
	if err != nil {
		n.removeFile(id)
		vol.Close()
		return nil, fmt.Errorf("attach loop device: %w", err)
	}
	sv.LoopDevice = dev
	return vol, nil
}

// detach undoes attach: loop device, FUSE file, engine handle.
func (n *nodeService) detach(ctx context.Context, sv *stagedVolume, vol OpenVolume) error {
	var errs []error
	if sv.LoopDevice != "" {
		if err := n.loop().Detach(ctx, sv.LoopDevice, n.filePath(sv.VolumeID)); err != nil {
			errs = append(errs, fmt.Errorf("detach %s: %w", sv.LoopDevice, err))
		}
	}
	if err := n.removeFile(sv.VolumeID); err != nil {
		errs = append(errs, err)
	}
	if vol != nil {
		if err := vol.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close volume: %w", err))
		}
	}
	return errors.Join(errs...)
}

// removeFile stops serving the volume's FUSE file. The kernel releases the
// loop device's file reference asynchronously after the detach, so a busy
// file is retried for a while.
func (n *nodeService) removeFile(id string) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := n.export.Remove(id)
		if err == nil || !errors.Is(err, errExportBusy) || time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond) // retry backoff, not ordering
	}
}

func (n *nodeService) mountOptions(sv *stagedVolume) []string {
	opts := append([]string{}, sv.MountFlags...)
	if sv.ReadOnly {
		opts = append(opts, "ro")
	}
	if sv.FSType == "xfs" {
		// A volume restored from a snapshot or cloned carries its
		// source's filesystem UUID, and XFS refuses to mount a second
		// filesystem with a UUID already mounted on the node.
		opts = append(opts, "nouuid")
	}
	return opts
}

// mountStaging formats the device if blank and mounts it at the staging path.
func (n *nodeService) mountStaging(sv *stagedVolume) error {
	if err := os.MkdirAll(sv.StagingPath, 0o750); err != nil {
		return err
	}
	if err := n.mounter().FormatAndMount(sv.LoopDevice, sv.StagingPath, sv.FSType, n.mountOptions(sv)); err != nil {
		return fmt.Errorf("format and mount %s at %s: %w", sv.LoopDevice, sv.StagingPath, err)
	}
	return nil
}

func (n *nodeService) unmountStaging(sv *stagedVolume) error {
	if sv.AccessType != accessMount {
		return nil
	}
	return n.unmountIfMounted(sv.StagingPath)
}

// isMounted reports whether p is a mount point; a mount whose FUSE or
// device went away (ENOTCONN, EIO, ESTALE) counts as mounted.
func (n *nodeService) isMounted(p string) (bool, error) {
	mounted, err := n.mounter().IsMountPoint(p)
	if err != nil {
		if mount.IsCorruptedMnt(err) {
			return true, nil
		}
		if errors.Is(err, os.ErrNotExist) {
			return false, nil
		}
		return false, err
	}
	return mounted, nil
}

func (n *nodeService) unmountIfMounted(p string) error {
	mounted, err := n.isMounted(p)
	if err != nil {
		return err
	}
	if !mounted {
		return nil
	}
	if err := n.mounter().Unmount(p); err != nil {
		return fmt.Errorf("unmount %s: %w", p, err)
	}
	return nil
}

func (n *nodeService) NodeUnstageVolume(ctx context.Context, req *csi.NodeUnstageVolumeRequest) (*csi.NodeUnstageVolumeResponse, error) {
	id, staging := req.GetVolumeId(), req.GetStagingTargetPath()
	if err := checkIDPath(id, "staging_target_path", staging); err != nil {
		return nil, err
	}
	sv := n.get(id)
	if sv == nil {
		return &csi.NodeUnstageVolumeResponse{}, nil // not staged here: done
	}
	if sv.StagingPath != staging {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s is staged at %s, not %s", id, sv.StagingPath, staging)
	}
	for t := range sv.Targets {
		if mounted, _ := n.isMounted(t); mounted {
			return nil, status.Errorf(codes.FailedPrecondition, "volume %s is still published at %s", id, t)
		}
	}
	if err := n.unmountStaging(sv); err != nil {
		return nil, toStatus(rpcNodeUnstage, err)
	}
	if err := n.detach(ctx, sv, n.openVolume(id)); err != nil {
		// The volume handle is closed by now or unusable: forget the
		// volume anyway only if the file is gone; else let the CO retry.
		if errors.Is(err, errExportBusy) {
			return nil, toStatus(rpcNodeUnstage, err)
		}
		klog.ErrorS(err, "Unstage left something behind", "volume", id)
	}
	if err := n.put(id, nil, nil); err != nil {
		return nil, toStatus(rpcNodeUnstage, err)
	}
	klog.InfoS("Volume unstaged", "volume", id, "staging", staging)
	return &csi.NodeUnstageVolumeResponse{}, nil
}
