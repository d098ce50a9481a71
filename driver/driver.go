package driver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/kubernetes-csi/csi-lib-utils/protosanitizer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
)

// Driver is the cowcsi CSI plugin: Identity, Controller and Node services
// served on one unix socket.
type Driver struct {
	opts Options
	deps Deps

	// ready is set once the engine is open and staged volumes are
	// recovered; Controller and Node calls are refused before.
	ready atomic.Bool
	// engine is written once before ready is set and read only after.
	engine Engine

	identity   *identityService
	controller *controllerService
	node       *nodeService
	inflight   *inFlight
}

// New validates opts and builds a Driver; Run serves it.
func New(opts Options, deps Deps) (*Driver, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	if deps.OpenEngine == nil || deps.MountExport == nil || deps.Loop == nil || deps.Mounter == nil || deps.Resizer == nil {
		return nil, errors.New("driver: every dependency in Deps is required (see DefaultDeps)")
	}
	d := &Driver{opts: opts, deps: deps, inflight: newInFlight()}
	d.identity = &identityService{d: d}
	d.node = newNodeService(d)
	d.controller = &controllerService{d: d}
	return d, nil
}

// Run takes the store's instance lock (failing if another instance holds
// it), listens on the endpoint, opens the store, recovers the volumes
// staged before a restart, and serves until ctx is cancelled. It then stops
// gracefully: in-flight calls get StopTimeout to finish, staged filesystems
// are synced, volumes flushed, the store closed and the FUSE filesystem
// unmounted.
func (d *Driver) Run(ctx context.Context) error {
	if err := os.MkdirAll(d.opts.StoreDir, 0o700); err != nil {
		return fmt.Errorf("store dir: %w", err)
	}
	// First of all: the socket, node state and FUSE mount point belong
	// to whoever holds this lock.
	lock, err := lockInstance(d.opts.StoreDir)
	if err != nil {
		return err
	}
	defer lock.Close()
	lis, sockPath, err := d.listen()
	if err != nil {
		return err
	}
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(logCalls, d.refuseUntilReady))
	csi.RegisterIdentityServer(srv, d.identity)
	csi.RegisterControllerServer(srv, &lockedController{ControllerServer: d.controller, f: d.inflight})
	csi.RegisterNodeServer(srv, &lockedNode{NodeServer: d.node, f: d.inflight})

	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()
	klog.InfoS("Listening", "endpoint", d.opts.Endpoint, "driver", d.opts.DriverName, "node", d.opts.NodeID)

	startErr := d.start(ctx)
	if startErr == nil {
		d.ready.Store(true)
		klog.InfoS("Ready", "store", d.opts.StoreDir)
		select {
		case <-ctx.Done():
		case err := <-served:
			startErr = fmt.Errorf("gRPC server stopped: %w", err)
		}
	}
	d.ready.Store(false)
	d.stopServer(srv)
	stopErr := d.shutdown()
	if err := os.Remove(sockPath); err != nil && !errors.Is(err, os.ErrNotExist) {
		klog.ErrorS(err, "Removing socket")
	}
	return errors.Join(startErr, stopErr)
}

// start opens the engine and brings the node side back.
func (d *Driver) start(ctx context.Context) error {
	// Before anything else: a freeze the previous instance left (its
	// child died with it) blocks every writer of that filesystem, and
	// recovery unmounts, which does not thaw.
	d.node.thawRecorded(ctx)
	engine, err := d.deps.OpenEngine(d.opts.engineDir())
	if err != nil {
		return fmt.Errorf("open store %s: %w", d.opts.engineDir(), err)
	}
	d.engine = engine
	if err := d.node.start(ctx); err != nil {
		return err
	}
	return nil
}

// stopServer lets in-flight calls finish for StopTimeout, then cancels them.
func (d *Driver) stopServer(srv *grpc.Server) {
	done := make(chan struct{})
	go func() {
		srv.GracefulStop()
		close(done)
	}()
	t := time.NewTimer(d.opts.StopTimeout)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		klog.InfoS("Graceful stop timed out; cancelling in-flight calls", "timeout", d.opts.StopTimeout)
		srv.Stop()
		<-done
	}
}

// shutdown makes everything acknowledged so far durable and releases the
// store. The kernel objects (mounts, loop devices) stay: their users keep
// their mounts, and the next instance rebuilds the I/O path under them.
func (d *Driver) shutdown() error {
	var errs []error
	errs = append(errs, d.node.shutdown())
	if d.engine != nil {
		if err := d.engine.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close store: %w", err))
		}
	}
	errs = append(errs, d.node.unmountExport())
	err := errors.Join(errs...)
	if err != nil {
		klog.ErrorS(err, "Stopping")
	} else {
		klog.InfoS("Stopped")
	}
	return err
}

// listen creates the unix socket with its final mode before it becomes
// visible: it is bound under a temporary name, chmod-ed and renamed into
// place, so no client can connect through a socket with looser permissions.
func (d *Driver) listen() (net.Listener, string, error) {
	path, err := socketPath(d.opts.Endpoint)
	if err != nil {
		return nil, "", err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, "", err
	}
	if err := removeStaleSocket(path); err != nil {
		return nil, "", err
	}
	tmp := filepath.Join(filepath.Dir(path), fmt.Sprintf(".%s.%d", filepath.Base(path), os.Getpid()))
	os.Remove(tmp)
	lis, err := net.Listen("unix", tmp)
	if err != nil {
		return nil, "", fmt.Errorf("listen on %s: %w", tmp, err)
	}
	// The listener must not remove the temporary name on Close: the
	// socket lives under its final name.
	lis.(*net.UnixListener).SetUnlinkOnClose(false)
	mode := os.FileMode(0o600)
	if d.opts.SocketGroupAccess {
		mode = 0o660
	}
	if err := os.Chmod(tmp, mode); err != nil {
		lis.Close()
		os.Remove(tmp)
		return nil, "", err
	}
	if err := os.Rename(tmp, path); err != nil {
		lis.Close()
		os.Remove(tmp)
		return nil, "", err
	}
	return lis, path, nil
}

// logCalls logs every call, with secrets stripped, and its outcome.
func logCalls(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	start := time.Now()
	klog.V(2).InfoS("GRPC call", "method", info.FullMethod, "request", protosanitizer.StripSecrets(req))
	resp, err := handler(ctx, req)
	if err != nil {
		klog.ErrorS(err, "GRPC error", "method", info.FullMethod, "code", status.Code(err), "duration", time.Since(start))
	} else {
		klog.V(4).InfoS("GRPC response", "method", info.FullMethod, "response", protosanitizer.StripSecrets(resp), "duration", time.Since(start))
	}
	return resp, err
}

// refuseUntilReady answers Unavailable to Controller and Node calls while
// the store is not open (starting, or stopping); Identity always answers,
// so that Probe can say "not ready".
func (d *Driver) refuseUntilReady(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if !d.ready.Load() && !strings.HasPrefix(info.FullMethod, "/csi.v1.Identity/") {
		return nil, status.Error(codes.Unavailable, "the driver is starting or stopping")
	}
	return handler(ctx, req)
}
