package driver

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
	"k8s.io/klog/v2"

	"github.com/cowcsi/cowcsi/cow"
)

const (
	// paramFreeze is the snapshot parameter that turns the filesystem
	// freeze off ("false"); the loop device is flushed either way.
	paramFreeze = "cowcsi.io/freeze"
	// reservedParamPrefix: keys the external-provisioner and
	// csi-snapshotter add themselves (--extra-create-metadata); accepted
	// and otherwise ignored.
	reservedParamPrefix = "csi.storage.k8s.io/"
	// listTokenPrefix marks pagination tokens; what follows is the ID the
	// next page starts at. IDs sort stably, so a token stays valid when
	// entries are added or deleted between pages.
	listTokenPrefix = "cowcsi-next:"
)

type controllerService struct {
	csi.UnimplementedControllerServer
	d *Driver
}

var _ csi.ControllerServer = (*controllerService)(nil)

func (c *controllerService) engine() Engine { return c.d.engine }

func (c *controllerService) ControllerGetCapabilities(ctx context.Context, req *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	var caps []*csi.ControllerServiceCapability
	for _, t := range []csi.ControllerServiceCapability_RPC_Type{
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME,
		csi.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT,
		csi.ControllerServiceCapability_RPC_LIST_SNAPSHOTS,
		csi.ControllerServiceCapability_RPC_GET_SNAPSHOT,
		csi.ControllerServiceCapability_RPC_LIST_VOLUMES,
		csi.ControllerServiceCapability_RPC_LIST_VOLUMES_PUBLISHED_NODES,
		csi.ControllerServiceCapability_RPC_CLONE_VOLUME,
		csi.ControllerServiceCapability_RPC_GET_CAPACITY,
		csi.ControllerServiceCapability_RPC_SINGLE_NODE_MULTI_WRITER,
		// No EXPAND_VOLUME, on purpose: the data is node-local and
		// csi-resizer has no node-deployment mode, so a
		// ControllerExpandVolume could reach the controller of a node
		// that does not hold the volume. Without this capability (and
		// with node EXPAND_VOLUME) external-resizer uses its trivial
		// resizer and NodeExpandVolume on the volume's own node grows
		// engine volume, loop device and filesystem. See doc.go.
	} {
		caps = append(caps, &csi.ControllerServiceCapability{
			Type: &csi.ControllerServiceCapability_Rpc{Rpc: &csi.ControllerServiceCapability_RPC{Type: t}},
		})
	}
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: caps}, nil
}

func (c *controllerService) topology() []*csi.Topology {
	return []*csi.Topology{{Segments: map[string]string{TopologyKey: c.d.opts.NodeID}}}
}

// reachable reports whether this node satisfies a topology: volumes exist
// only on the node that created them.
func (c *controllerService) reachable(t *csi.Topology) bool {
	return t.GetSegments()[TopologyKey] == c.d.opts.NodeID
}

// checkParameters refuses parameter keys the driver does not know, so
// that a typo in a StorageClass or VolumeSnapshotClass is an error rather
// than silently ignored.
func checkParameters(params map[string]string, known ...string) error {
	for k := range params {
		if strings.HasPrefix(k, reservedParamPrefix) {
			continue
		}
		ok := false
		for _, kn := range known {
			ok = ok || k == kn
		}
		if !ok {
			return status.Errorf(codes.InvalidArgument, "unknown parameter %q", k)
		}
	}
	return nil
}

// volumeSize applies the CSI capacity range rules: required_bytes is the
// minimum, limit_bytes the maximum, the default size applies when neither
// is set, and a source larger than the limit cannot fit. Sizes round up to
// 1 MiB, or to the engine's block size when the limit forbids 1 MiB.
func volumeSize(cr *csi.CapacityRange, sourceSize, defaultSize int64) (int64, error) {
	required, limit := cr.GetRequiredBytes(), cr.GetLimitBytes()
	switch {
	case required < 0 || limit < 0:
		return 0, status.Errorf(codes.InvalidArgument, "negative capacity range (required %d, limit %d)", required, limit)
	case limit > 0 && limit < required:
		return 0, status.Errorf(codes.OutOfRange, "limit_bytes %d is below required_bytes %d", limit, required)
	case required > maxVolumeSize:
		return 0, status.Errorf(codes.OutOfRange, "required_bytes %d is above the maximum volume size %d", required, maxVolumeSize)
	case limit > 0 && sourceSize > limit:
		return 0, status.Errorf(codes.OutOfRange, "the source is %d bytes, more than limit_bytes %d", sourceSize, limit)
	}
	size := required
	if size == 0 {
		size = defaultSize
		if limit > 0 && limit < size {
			size = limit
		}
	}
	size = max(size, sourceSize)
	rounded := roundUp(size, mib)
	if limit > 0 && rounded > limit {
		rounded = roundUp(size, cow.BlockSize)
		if rounded > limit {
			return 0, status.Errorf(codes.OutOfRange, "no multiple of %d bytes lies in [%d, %d]", cow.BlockSize, required, limit)
		}
	}
	if rounded > maxVolumeSize {
		return 0, status.Errorf(codes.OutOfRange, "%d bytes is above the maximum volume size %d", rounded, maxVolumeSize)
	}
	return rounded, nil
}

func (c *controllerService) CreateVolume(ctx context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	if err := c.checkCreateRequest(req); err != nil {
		return nil, err
	}
	e := c.engine()
	srcSnap, srcVol, err := contentSourceIDs(req.GetVolumeContentSource())
	if err != nil {
		return nil, err
	}
	id := volumeIDFor(req.GetName())
	labels := map[string]string{
		labelName:       req.GetName(),
		labelParameters: parametersDigest(req.GetParameters()),
		labelSource:     sourceLabel(srcSnap, srcVol),
	}
	// The idempotency check comes before the source lookup: a retry
	// whose volume exists must get it even if its source has been
	// deleted since (the CSI spec's "same name, same source: OK").
	if info, err := e.GetVolume(id); err == nil {
		return c.existingVolume(req, info, labels)
	} else if !errors.Is(err, cow.ErrNotFound) {
		return nil, toStatus(rpcCreateVolume, err)
	}

	srcSize, err := c.sourceSize(srcSnap, srcVol)
	if err != nil {
		return nil, err
	}
	size, err := volumeSize(req.GetCapacityRange(), srcSize, c.d.opts.DefaultVolumeSize)
	if err != nil {
		return nil, err
	}
	labels[labelRequestedSize] = formatSize(size)
	q := notQuiesced
	if srcVol != "" {
		// A clone of a volume mounted here must see what its users
		// wrote, as a snapshot would.
		if q, err = c.d.node.quiesce(ctx, srcVol, true); err != nil {
			return nil, toStatus(rpcCreateVolume, err)
		}
		defer q.Release() // on every path, a panic included
	}
	cctx, cancel := q.bound(ctx)
	defer cancel()
	info, err := e.CreateVolume(cctx, cow.VolumeSpec{
		ID: id, Size: size, SourceSnapshot: srcSnap, SourceVolume: srcVol, Labels: labels,
	})
	if rerr := q.Release(); rerr != nil {
		if err == nil {
			c.undo("volume", id, e.DeleteVolume)
		}
		return nil, toStatus(rpcCreateVolume, fmt.Errorf("clone of %s: %w", srcVol, rerr))
	}
	if errors.Is(err, cow.ErrExists) {
		// Created concurrently by an earlier attempt: compare.
		if info, gerr := e.GetVolume(id); gerr == nil {
			return c.existingVolume(req, info, labels)
		}
	}
	if err != nil {
		return nil, toStatus(rpcCreateVolume, err)
	}
	return &csi.CreateVolumeResponse{Volume: c.csiVolume(info)}, nil
}

// checkCreateRequest validates what CreateVolume accepts, before any engine
// access: name, capabilities, parameters, capacity range and topology.
func (c *controllerService) checkCreateRequest(req *csi.CreateVolumeRequest) error {
	if err := checkName(req.GetName()); err != nil {
		return err
	}
	if len(req.GetVolumeCapabilities()) == 0 {
		return status.Error(codes.InvalidArgument, "volume_capabilities are required")
	}
	for _, vc := range req.GetVolumeCapabilities() {
		if p := capabilityProblem(vc); p != "" {
			return status.Errorf(codes.InvalidArgument, "unsupported volume capability: %s", p)
		}
	}
	if err := checkParameters(req.GetParameters()); err != nil {
		return err
	}
	if _, err := volumeSize(req.GetCapacityRange(), 0, c.d.opts.DefaultVolumeSize); err != nil {
		return err // checked here too: an existing volume answers before sizing
	}
	if len(req.GetMutableParameters()) > 0 {
		return status.Error(codes.InvalidArgument, "mutable_parameters are not supported")
	}
	if reqs := req.GetAccessibilityRequirements().GetRequisite(); len(reqs) > 0 {
		ok := false
		for _, t := range reqs {
			ok = ok || c.reachable(t)
		}
		if !ok {
			// The spec's code for "unable to provision in the requested
			// topology".
			return status.Errorf(codes.ResourceExhausted, "volumes can only be created on node %q (%s), which is not among the requisite topologies", c.d.opts.NodeID, TopologyKey)
		}
	}
	return nil
}

func sourceLabel(snap, vol string) string {
	switch {
	case snap != "":
		return "snapshot:" + snap
	case vol != "":
		return "volume:" + vol
	}
	return ""
}

// existingVolume answers a CreateVolume whose volume already exists: the
// same request again gets the volume, anything else is AlreadyExists.
func (c *controllerService) existingVolume(req *csi.CreateVolumeRequest, info cow.VolumeInfo, want map[string]string) (*csi.CreateVolumeResponse, error) {
	got := info.Labels
	switch {
	case got[labelName] != want[labelName]:
		return nil, status.Errorf(codes.AlreadyExists, "volume ID %s belongs to another name", info.ID)
	case got[labelParameters] != want[labelParameters]:
		return nil, status.Errorf(codes.AlreadyExists, "volume %q exists with other parameters", req.GetName())
	case got[labelSource] != want[labelSource]:
		return nil, status.Errorf(codes.AlreadyExists, "volume %q exists with another content source (%q)", req.GetName(), got[labelSource])
	}
	// The size it was created with must satisfy this request's range
	// (it may have grown since, by expansion).
	created, err := strconv.ParseInt(got[labelRequestedSize], 10, 64)
	if err != nil {
		created = info.Size
	}
	cr := req.GetCapacityRange()
	if created < cr.GetRequiredBytes() || (cr.GetLimitBytes() > 0 && created > cr.GetLimitBytes()) {
		return nil, status.Errorf(codes.AlreadyExists, "volume %q exists with size %d, outside the requested range [%d, %d]",
			req.GetName(), created, cr.GetRequiredBytes(), cr.GetLimitBytes())
	}
	return &csi.CreateVolumeResponse{Volume: c.csiVolume(info)}, nil
}

func (c *controllerService) csiVolume(info cow.VolumeInfo) *csi.Volume {
	v := &csi.Volume{
		VolumeId:           info.ID,
		CapacityBytes:      info.Size,
		AccessibleTopology: c.topology(),
	}
	switch {
	case info.SourceSnapshot != "":
		v.ContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
			Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: info.SourceSnapshot}}}
	case info.SourceVolume != "":
		v.ContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
			Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: info.SourceVolume}}}
	}
	return v
}

func (c *controllerService) DeleteVolume(ctx context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	if err := checkID("volume ID", req.GetVolumeId()); err != nil {
		return nil, err
	}
	id := req.GetVolumeId()
	if c.d.node.isStaged(id) {
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s is staged on node %s", id, c.d.opts.NodeID)
	}
	err := c.engine().DeleteVolume(ctx, id)
	if errors.Is(err, cow.ErrNotFound) {
		return &csi.DeleteVolumeResponse{}, nil
	}
	if err != nil {
		return nil, toStatus(rpcDeleteVolume, err)
	}
	return &csi.DeleteVolumeResponse{}, nil
}

func (c *controllerService) ValidateVolumeCapabilities(ctx context.Context, req *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	if err := checkID("volume ID", req.GetVolumeId()); err != nil {
		return nil, err
	}
	if len(req.GetVolumeCapabilities()) == 0 {
		return nil, status.Error(codes.InvalidArgument, "volume_capabilities are required")
	}
	if _, err := c.engine().GetVolume(req.GetVolumeId()); err != nil {
		return nil, toStatus(rpcValidateCaps, err)
	}
	for _, vc := range req.GetVolumeCapabilities() {
		if p := capabilityProblem(vc); p != "" {
			return &csi.ValidateVolumeCapabilitiesResponse{Message: p}, nil
		}
	}
	if err := checkParameters(req.GetParameters()); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: status.Convert(err).Message()}, nil
	}
	return &csi.ValidateVolumeCapabilitiesResponse{Confirmed: &csi.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext:      req.GetVolumeContext(),
		VolumeCapabilities: req.GetVolumeCapabilities(),
		Parameters:         req.GetParameters(),
	}}, nil
}

// page cuts a sorted list of IDs at a pagination token.
func page(ids []string, token string, maxEntries int32) (start, end int, next string, err error) {
	if maxEntries < 0 {
		return 0, 0, "", status.Errorf(codes.InvalidArgument, "max_entries %d is negative", maxEntries)
	}
	if token != "" {
		from, ok := strings.CutPrefix(token, listTokenPrefix)
		if !ok || cow.ValidateID(from) != nil {
			return 0, 0, "", status.Errorf(codes.Aborted, "invalid starting_token %q", token)
		}
		start = sort.SearchStrings(ids, from)
	}
	end = len(ids)
	if maxEntries > 0 && start+int(maxEntries) < end {
		end = start + int(maxEntries)
		next = listTokenPrefix + ids[end]
	}
	return start, end, next, nil
}

func (c *controllerService) ListVolumes(ctx context.Context, req *csi.ListVolumesRequest) (*csi.ListVolumesResponse, error) {
	vols := c.engine().ListVolumes() // sorted by ID
	ids := make([]string, len(vols))
	for i, v := range vols {
		ids[i] = v.ID
	}
	start, end, next, err := page(ids, req.GetStartingToken(), req.GetMaxEntries())
	if err != nil {
		return nil, err
	}
	resp := &csi.ListVolumesResponse{NextToken: next}
	for _, v := range vols[start:end] {
		st := &csi.ListVolumesResponse_VolumeStatus{}
		if c.d.node.isStaged(v.ID) {
			st.PublishedNodeIds = []string{c.d.opts.NodeID}
		}
		resp.Entries = append(resp.Entries, &csi.ListVolumesResponse_Entry{Volume: c.csiVolume(v), Status: st})
	}
	return resp, nil
}

func (c *controllerService) GetCapacity(ctx context.Context, req *csi.GetCapacityRequest) (*csi.GetCapacityResponse, error) {
	for _, vc := range req.GetVolumeCapabilities() {
		if capabilityProblem(vc) != "" {
			return &csi.GetCapacityResponse{}, nil // no capacity for what cannot be provisioned
		}
	}
	if t := req.GetAccessibleTopology(); t != nil && !c.reachable(t) {
		// Storage capacity tracking asks per topology segment; this
		// node's store serves only its own segment.
		return &csi.GetCapacityResponse{}, nil
	}
	_, free, err := c.engine().Capacity()
	if err != nil {
		return nil, toStatus(rpcGetCapacity, err)
	}
	return &csi.GetCapacityResponse{AvailableCapacity: free}, nil
}

// snapshotParameters validates CreateSnapshot parameters and says whether
// to freeze.
func snapshotParameters(params map[string]string) (freeze bool, err error) {
	if err := checkParameters(params, paramFreeze); err != nil {
		return false, err
	}
	v, ok := params[paramFreeze]
	if !ok {
		return true, nil
	}
	b, perr := strconv.ParseBool(v)
	if perr != nil {
		return false, status.Errorf(codes.InvalidArgument, "parameter %s=%q: want true or false", paramFreeze, v)
	}
	return b, nil
}

func (c *controllerService) CreateSnapshot(ctx context.Context, req *csi.CreateSnapshotRequest) (*csi.CreateSnapshotResponse, error) {
	if err := checkName(req.GetName()); err != nil {
		return nil, err
	}
	src := req.GetSourceVolumeId()
	if src == "" {
		return nil, status.Error(codes.InvalidArgument, "source_volume_id is required")
	}
	if err := checkID("source volume ID", src); err != nil {
		return nil, status.Errorf(codes.NotFound, "source volume %q not found", src)
	}
	freeze, err := snapshotParameters(req.GetParameters())
	if err != nil {
		return nil, err
	}
	if reqs := req.GetAccessibilityRequirements().GetRequisite(); len(reqs) > 0 {
		ok := false
		for _, t := range reqs {
			ok = ok || c.reachable(t)
		}
		if !ok {
			return nil, status.Errorf(codes.ResourceExhausted, "snapshots can only be created on node %q", c.d.opts.NodeID)
		}
	}
	e := c.engine()
	id := snapshotIDFor(req.GetName())
	labels := map[string]string{
		labelName:       req.GetName(),
		labelParameters: parametersDigest(req.GetParameters()),
	}
	if info, err := e.GetSnapshot(id); err == nil {
		return c.existingSnapshot(req, info, labels)
	} else if !errors.Is(err, cow.ErrNotFound) {
		return nil, toStatus(rpcCreateSnapshot, err)
	}
	if _, err := e.GetVolume(src); err != nil {
		return nil, toStatus(rpcCreateSnapshot, err)
	}

	q, err := c.d.node.quiesce(ctx, src, freeze)
	if err != nil {
		return nil, toStatus(rpcCreateSnapshot, err)
	}
	defer q.Release() // on every path, a panic included
	sctx, cancel := q.bound(ctx)
	defer cancel()
	info, err := e.CreateSnapshot(sctx, cow.SnapshotSpec{ID: id, VolumeID: src, Labels: labels})
	if rerr := q.Release(); rerr != nil {
		// The cut may have come after the thaw had begun: not the
		// consistent snapshot this call promises.
		if err == nil {
			c.undo("snapshot", id, e.DeleteSnapshot)
		}
		return nil, toStatus(rpcCreateSnapshot, fmt.Errorf("snapshot of %s: %w", src, rerr))
	}
	if errors.Is(err, cow.ErrExists) {
		if info, gerr := e.GetSnapshot(id); gerr == nil {
			return c.existingSnapshot(req, info, labels)
		}
	}
	if err != nil {
		return nil, toStatus(rpcCreateSnapshot, err)
	}
	return &csi.CreateSnapshotResponse{Snapshot: c.csiSnapshot(info)}, nil
}

// undo deletes what a call created but must not hand out.
func (c *controllerService) undo(what, id string, del func(context.Context, string) error) {
	if err := del(context.Background(), id); err != nil {
		klog.ErrorS(err, "Deleting a "+what+" made outside its frozen window", "id", id)
	}
}

func (c *controllerService) existingSnapshot(req *csi.CreateSnapshotRequest, info cow.SnapshotInfo, want map[string]string) (*csi.CreateSnapshotResponse, error) {
	switch {
	case info.Labels[labelName] != want[labelName]:
		return nil, status.Errorf(codes.AlreadyExists, "snapshot ID %s belongs to another name", info.ID)
	case info.VolumeID != req.GetSourceVolumeId():
		return nil, status.Errorf(codes.AlreadyExists, "snapshot %q exists for source volume %s", req.GetName(), info.VolumeID)
	case info.Labels[labelParameters] != want[labelParameters]:
		return nil, status.Errorf(codes.AlreadyExists, "snapshot %q exists with other parameters", req.GetName())
	}
	return &csi.CreateSnapshotResponse{Snapshot: c.csiSnapshot(info)}, nil
}

func (c *controllerService) csiSnapshot(info cow.SnapshotInfo) *csi.Snapshot {
	return &csi.Snapshot{
		SnapshotId:     info.ID,
		SourceVolumeId: info.VolumeID,
		SizeBytes:      info.Size,
		CreationTime:   timestamppb.New(info.CreatedAt),
		// O(1) and complete when CreateSnapshot returns: no upload phase.
		ReadyToUse: true,
	}
}

func (c *controllerService) DeleteSnapshot(ctx context.Context, req *csi.DeleteSnapshotRequest) (*csi.DeleteSnapshotResponse, error) {
	if err := checkID("snapshot ID", req.GetSnapshotId()); err != nil {
		return nil, err
	}
	err := c.engine().DeleteSnapshot(ctx, req.GetSnapshotId())
	if err != nil && !errors.Is(err, cow.ErrNotFound) {
		return nil, toStatus(rpcDeleteSnapshot, err)
	}
	return &csi.DeleteSnapshotResponse{}, nil
}

func (c *controllerService) GetSnapshot(ctx context.Context, req *csi.GetSnapshotRequest) (*csi.GetSnapshotResponse, error) {
	if err := checkID("snapshot ID", req.GetSnapshotId()); err != nil {
		return nil, err
	}
	info, err := c.engine().GetSnapshot(req.GetSnapshotId())
	if err != nil {
		return nil, toStatus(rpcGetSnapshot, err)
	}
	return &csi.GetSnapshotResponse{Snapshot: c.csiSnapshot(info)}, nil
}

func (c *controllerService) ListSnapshots(ctx context.Context, req *csi.ListSnapshotsRequest) (*csi.ListSnapshotsResponse, error) {
	var snaps []cow.SnapshotInfo
	switch {
	case req.GetSnapshotId() != "":
		// A filter that matches nothing is an empty list, not an error.
		if cow.ValidateID(req.GetSnapshotId()) == nil {
			if info, err := c.engine().GetSnapshot(req.GetSnapshotId()); err == nil {
				snaps = append(snaps, info)
			} else if !errors.Is(err, cow.ErrNotFound) {
				return nil, toStatus(rpcListSnapshots, err)
			}
		}
	default:
		snaps = c.engine().ListSnapshots() // sorted by ID
	}
	if src := req.GetSourceVolumeId(); src != "" {
		kept := snaps[:0:0]
		for _, s := range snaps {
			if s.VolumeID == src {
				kept = append(kept, s)
			}
		}
		snaps = kept
	}
	ids := make([]string, len(snaps))
	for i, s := range snaps {
		ids[i] = s.ID
	}
	start, end, next, err := page(ids, req.GetStartingToken(), req.GetMaxEntries())
	if err != nil {
		return nil, err
	}
	resp := &csi.ListSnapshotsResponse{NextToken: next}
	for _, s := range snaps[start:end] {
		resp.Entries = append(resp.Entries, &csi.ListSnapshotsResponse_Entry{Snapshot: c.csiSnapshot(s)})
	}
	return resp, nil
}

// capabilityProblem says why a volume capability is not supported, or ""
// if it is.
func capabilityProblem(vc *csi.VolumeCapability) string {
	if vc == nil {
		return "volume capability is missing"
	}
	switch m := vc.GetAccessMode().GetMode(); m {
	case csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER,
		csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY,
		csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER,
		csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER:
	case csi.VolumeCapability_AccessMode_UNKNOWN:
		return "access mode is missing"
	default:
		return fmt.Sprintf("access mode %s: volumes are local to one node", m)
	}
	switch {
	case vc.GetBlock() != nil:
	case vc.GetMount() != nil:
		switch fs := vc.GetMount().GetFsType(); fs {
		case "", "ext4", "xfs":
		default:
			return fmt.Sprintf("filesystem type %q: ext4 and xfs are supported", fs)
		}
		if vc.GetMount().GetVolumeMountGroup() != "" {
			return "volume_mount_group is not supported"
		}
	default:
		return "access type (block or mount) is missing"
	}
	return ""
}
