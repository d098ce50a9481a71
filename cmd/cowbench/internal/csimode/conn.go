package csimode

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// ErrUnreachable is returned when the driver cannot be reached or does not
// become ready.
var ErrUnreachable = errors.New("CSI driver unreachable")

// ErrCapability is returned when the driver lacks a capability the
// benchmark cannot do without.
var ErrCapability = errors.New("CSI driver lacks a capability")

// kindError is an error of a kind (errors.Is(err, kind)) whose message is
// complete without the kind's.
type kindError struct {
	kind error
	msg  string
}

func (e *kindError) Error() string { return e.msg }
func (e *kindError) Unwrap() error { return e.kind }

func errorOf(kind error, format string, args ...any) error {
	return &kindError{kind: kind, msg: fmt.Sprintf(format, args...)}
}

// target turns an endpoint as drivers and sidecars spell it (--csi-address,
// --endpoint) into a gRPC target, and the socket path for unix endpoints.
func target(endpoint string) (tgt, socket string, err error) {
	switch {
	case strings.HasPrefix(endpoint, "unix://"):
		socket = strings.TrimPrefix(endpoint, "unix://")
	case strings.HasPrefix(endpoint, "unix:"):
		socket = strings.TrimPrefix(endpoint, "unix:")
	case strings.HasPrefix(endpoint, "tcp://"):
		return "passthrough:///" + strings.TrimPrefix(endpoint, "tcp://"), "", nil
	case strings.HasPrefix(endpoint, "/"), strings.HasPrefix(endpoint, "."):
		socket = endpoint
	default:
		return "", "", fmt.Errorf("endpoint %q: want unix:///path/csi.sock, /path/csi.sock or tcp://host:port", endpoint)
	}
	if socket == "" {
		return "", "", fmt.Errorf("endpoint %q has no socket path", endpoint)
	}
	if socket, err = filepath.Abs(socket); err != nil {
		return "", "", err
	}
	return "unix://" + socket, socket, nil
}

// driverConn is a connection to a driver and what it said it can do.
type driverConn struct {
	endpoint string
	cc       *grpc.ClientConn
	ident    csi.IdentityClient
	ctrl     csi.ControllerClient
	node     csi.NodeClient

	name, version string
	topology      bool // VOLUME_ACCESSIBILITY_CONSTRAINTS
	ctrlCaps      map[csi.ControllerServiceCapability_RPC_Type]bool
	nodeCaps      map[csi.NodeServiceCapability_RPC_Type]bool
	nodeInfo      *csi.NodeGetInfoResponse
}

// dial connects to endpoint and waits until Probe says ready. alive, if
// set, reports a driver process that exited, to fail at once rather than at
// the timeout.
func dial(ctx context.Context, endpoint string, timeout time.Duration, waitForSocket bool, alive func() error) (*driverConn, error) {
	tgt, socket, err := target(endpoint)
	if err != nil {
		return nil, err
	}
	if socket != "" && !waitForSocket {
		if _, err := os.Stat(socket); err != nil {
			return nil, errorOf(ErrUnreachable, "cannot reach the CSI driver at %s: no socket at %s (is the driver running, and is this the socket of its --endpoint/--csi-address?)", endpoint, socket)
		}
	}
	cc, err := grpc.NewClient(tgt, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, errorOf(ErrUnreachable, "%s: %v", endpoint, err)
	}
	d := &driverConn{endpoint: endpoint, cc: cc, ident: csi.NewIdentityClient(cc),
		ctrl: csi.NewControllerClient(cc), node: csi.NewNodeClient(cc)}
	deadline := time.Now().Add(timeout)
	var last error
	for {
		if alive != nil {
			if err := alive(); err != nil {
				cc.Close()
				return nil, err
			}
		}
		pctx, cancel := context.WithTimeout(ctx, time.Second)
		r, err := d.ident.Probe(pctx, &csi.ProbeRequest{})
		cancel()
		switch {
		case err == nil && (r.GetReady() == nil || r.GetReady().GetValue()):
			// An unset ready field means ready, says the spec.
			return d, nil
		case err == nil:
			last = errors.New("the driver answers Probe with ready=false")
		default:
			last = err
		}
		if ctx.Err() != nil {
			cc.Close()
			return nil, ctx.Err()
		}
		if time.Now().After(deadline) {
			cc.Close()
			return nil, errorOf(ErrUnreachable, "cannot reach the CSI driver at %s within %v: %v", endpoint, timeout, last)
		}
		// Nothing to watch: a driver says it is ready only when asked.
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (d *driverConn) Close() error { return d.cc.Close() }

// discover asks the driver who it is and what it can do, and checks the
// capabilities the benchmark needs. needNode says whether node calls will
// be made (data is written).
func (d *driverConn) discover(ctx context.Context, needNode bool) error {
	info, err := d.ident.GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
	if err != nil {
		return fmt.Errorf("GetPluginInfo at %s: %w", d.endpoint, err)
	}
	d.name, d.version = info.GetName(), info.GetVendorVersion()
	pc, err := d.ident.GetPluginCapabilities(ctx, &csi.GetPluginCapabilitiesRequest{})
	if err != nil {
		return fmt.Errorf("GetPluginCapabilities of %s: %w", d.name, err)
	}
	controller := false
	for _, c := range pc.GetCapabilities() {
		switch c.GetService().GetType() {
		case csi.PluginCapability_Service_CONTROLLER_SERVICE:
			controller = true
		case csi.PluginCapability_Service_VOLUME_ACCESSIBILITY_CONSTRAINTS:
			d.topology = true
		}
	}
	if !controller {
		return errorOf(ErrCapability, "%s at %s does not offer the CONTROLLER_SERVICE plugin capability: it cannot create volumes or snapshots (is this the driver's controller endpoint?)", d.name, d.endpoint)
	}
	cc, err := d.ctrl.ControllerGetCapabilities(ctx, &csi.ControllerGetCapabilitiesRequest{})
	if err != nil {
		return fmt.Errorf("ControllerGetCapabilities of %s: %w", d.name, err)
	}
	d.ctrlCaps = map[csi.ControllerServiceCapability_RPC_Type]bool{}
	for _, c := range cc.GetCapabilities() {
		d.ctrlCaps[c.GetRpc().GetType()] = true
	}
	if !d.ctrlCaps[csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME] {
		return errorOf(ErrCapability, "%s does not have the CREATE_DELETE_VOLUME controller capability: cowbench cannot create the volumes to snapshot", d.name)
	}
	if !d.ctrlCaps[csi.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT] {
		return errorOf(ErrCapability, "%s does not support snapshots: no CREATE_DELETE_SNAPSHOT controller capability", d.name)
	}
	if !needNode && !d.topology {
		return nil
	}
	nc, err := d.node.NodeGetCapabilities(ctx, &csi.NodeGetCapabilitiesRequest{})
	if err != nil {
		return fmt.Errorf("NodeGetCapabilities of %s (needed to write data; --write 0 needs no node service): %w", d.name, err)
	}
	d.nodeCaps = map[csi.NodeServiceCapability_RPC_Type]bool{}
	for _, c := range nc.GetCapabilities() {
		d.nodeCaps[c.GetRpc().GetType()] = true
	}
	if d.nodeInfo, err = d.node.NodeGetInfo(ctx, &csi.NodeGetInfoRequest{}); err != nil {
		return fmt.Errorf("NodeGetInfo of %s: %w", d.name, err)
	}
	return nil
}

// canClone says whether the driver can create a volume from a volume.
func (d *driverConn) canClone() bool {
	return d.ctrlCaps[csi.ControllerServiceCapability_RPC_CLONE_VOLUME]
}

// staged says whether the driver wants NodeStageVolume before publishing.
func (d *driverConn) staged() bool {
	return d.nodeCaps[csi.NodeServiceCapability_RPC_STAGE_UNSTAGE_VOLUME]
}

// accessibility asks for volumes on this node, as csi-provisioner does for
// a claim whose pod was scheduled here.
func (d *driverConn) accessibility() *csi.TopologyRequirement {
	if !d.topology || d.nodeInfo.GetAccessibleTopology() == nil {
		return nil
	}
	t := d.nodeInfo.GetAccessibleTopology()
	return &csi.TopologyRequirement{Requisite: []*csi.Topology{t}, Preferred: []*csi.Topology{t}}
}
