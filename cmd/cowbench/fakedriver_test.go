package main

import (
	"context"
	"fmt"
	"maps"
	"net"
	"path/filepath"
	"sync"
	"testing"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// fakeDriver is an in-memory CSI controller: volumes and snapshots are map
// entries. It has no node service, so runs against it use --write 0.
type fakeDriver struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedControllerServer

	snapshots bool // CREATE_DELETE_SNAPSHOT
	clone     bool // CLONE_VOLUME
	// notReady is how many CreateSnapshot calls of a name answer
	// ready_to_use=false before it is ready.
	notReady int
	// failDeleteSnapshot fails every DeleteSnapshot.
	failDeleteSnapshot bool
	// onCreateSnapshot, if set, is called at each CreateSnapshot.
	onCreateSnapshot func()

	mu    sync.Mutex
	vols  map[string]string // name -> ID
	snaps map[string]string
	polls map[string]int
}

// serveFake serves d on a unix socket in a temporary directory and returns
// the endpoint.
func serveFake(t *testing.T, d *fakeDriver) string {
	t.Helper()
	d.vols, d.snaps, d.polls = map[string]string{}, map[string]string{}, map[string]int{}
	sock := filepath.Join(t.TempDir(), "csi.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	csi.RegisterIdentityServer(s, d)
	csi.RegisterControllerServer(s, d)
	go func() { _ = s.Serve(l) }()
	t.Cleanup(s.Stop)
	return "unix://" + sock
}

// left returns how many volumes and snapshots exist.
func (d *fakeDriver) left() (int, int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.vols), len(d.snaps)
}

func (d *fakeDriver) GetPluginInfo(context.Context, *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return &csi.GetPluginInfoResponse{Name: "fake.csi.test", VendorVersion: "v0"}, nil
}

func (d *fakeDriver) GetPluginCapabilities(context.Context, *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	return &csi.GetPluginCapabilitiesResponse{Capabilities: []*csi.PluginCapability{{Type: &csi.PluginCapability_Service_{
		Service: &csi.PluginCapability_Service{Type: csi.PluginCapability_Service_CONTROLLER_SERVICE}}}}}, nil
}

func (d *fakeDriver) Probe(context.Context, *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	return &csi.ProbeResponse{Ready: wrapperspb.Bool(true)}, nil
}

func (d *fakeDriver) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	types := []csi.ControllerServiceCapability_RPC_Type{csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME}
	if d.snapshots {
		types = append(types, csi.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT)
	}
	if d.clone {
		types = append(types, csi.ControllerServiceCapability_RPC_CLONE_VOLUME)
	}
	var caps []*csi.ControllerServiceCapability
	for _, t := range types {
		caps = append(caps, &csi.ControllerServiceCapability{Type: &csi.ControllerServiceCapability_Rpc{
			Rpc: &csi.ControllerServiceCapability_RPC{Type: t}}})
	}
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: caps}, nil
}

func (d *fakeDriver) CreateVolume(_ context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if src := req.GetVolumeContentSource(); src != nil {
		if !d.has(d.snaps, src.GetSnapshot().GetSnapshotId()) && !d.has(d.vols, src.GetVolume().GetVolumeId()) {
			return nil, status.Error(codes.NotFound, "no such source")
		}
	}
	id, ok := d.vols[req.GetName()]
	if !ok {
		id = fmt.Sprintf("vol-%d", len(d.vols)+len(d.snaps)+len(d.polls))
		d.vols[req.GetName()] = id
	}
	return &csi.CreateVolumeResponse{Volume: &csi.Volume{VolumeId: id, CapacityBytes: req.GetCapacityRange().GetRequiredBytes(),
		ContentSource: req.GetVolumeContentSource()}}, nil
}

func (d *fakeDriver) has(m map[string]string, id string) bool {
	for _, v := range m {
		if v == id && id != "" {
			return true
		}
	}
	return false
}

func (d *fakeDriver) DeleteVolume(_ context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	maps.DeleteFunc(d.vols, func(_, id string) bool { return id == req.GetVolumeId() })
	return &csi.DeleteVolumeResponse{}, nil
}

func (d *fakeDriver) CreateSnapshot(_ context.Context, req *csi.CreateSnapshotRequest) (*csi.CreateSnapshotResponse, error) {
	if d.onCreateSnapshot != nil {
		d.onCreateSnapshot()
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.has(d.vols, req.GetSourceVolumeId()) {
		return nil, status.Error(codes.NotFound, "no such volume")
	}
	id, ok := d.snaps[req.GetName()]
	if !ok {
		id = fmt.Sprintf("snap-%d", len(d.vols)+len(d.snaps)+len(d.polls))
		d.snaps[req.GetName()] = id
	}
	d.polls[req.GetName()]++
	ready := d.polls[req.GetName()] > d.notReady
	return &csi.CreateSnapshotResponse{Snapshot: &csi.Snapshot{SnapshotId: id, SourceVolumeId: req.GetSourceVolumeId(), ReadyToUse: ready}}, nil
}

func (d *fakeDriver) DeleteSnapshot(_ context.Context, req *csi.DeleteSnapshotRequest) (*csi.DeleteSnapshotResponse, error) {
	if d.failDeleteSnapshot {
		return nil, status.Error(codes.Internal, "the fake refuses to delete snapshots")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	maps.DeleteFunc(d.snaps, func(_, id string) bool { return id == req.GetSnapshotId() })
	return &csi.DeleteSnapshotResponse{}, nil
}
