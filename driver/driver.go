package driver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"runtime/debug"
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
	// calls counts running handlers, for the stop sequence.
	calls *callTracker
}

// New validates opts and builds a Driver; Run serves it.
func New(opts Options, deps Deps) (*Driver, error) {
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	if deps.OpenEngine == nil || deps.MountExport == nil || deps.Loop == nil || deps.Mounter == nil || deps.Resizer == nil {
		return nil, errors.New("driver: every dependency in Deps is required (see DefaultDeps)")
	}
	d := &Driver{opts: opts, deps: deps, inflight: newInFlight(), calls: newCallTracker()}
	d.identity = &identityService{d: d}
	d.node = newNodeService(d)
	d.controller = &controllerService{d: d}
	return d, nil
}

// Run takes the store's instance lock (failing if another live instance
// holds it; a previous one stuck exiting is freed, see takeInstance),
// listens on the endpoint, opens the store, recovers the volumes staged before a restart, and serves until ctx is cancelled. It then stops
// within StopTimeout (see stopClock): in-flight calls get part of it to
// finish, staged filesystems are synced, volumes flushed, the store closed
// and the FUSE filesystem unmounted.
func (d *Driver) Run(ctx context.Context) error {
	if err := os.MkdirAll(d.opts.StoreDir, 0o700); err != nil {
		return fmt.Errorf("store dir: %w", err)
	}
	// First of all: the socket, node state and FUSE mount point belong
	// to whoever holds this lock.
	lock, err := takeInstance(ctx, d.opts.StoreDir, d.opts.fuseDir())
	if err != nil {
		return err
	}
	defer lock.Close()
	lis, sockPath, err := d.listen()
	if err != nil {
		return err
	}
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(d.calls.intercept, logCalls, recoverPanics, d.refuseUntilReady))
	csi.RegisterIdentityServer(srv, d.identity)
	csi.RegisterControllerServer(srv, &lockedController{ControllerServer: d.controller, f: d.inflight})
	csi.RegisterNodeServer(srv, &lockedNode{NodeServer: d.node, f: d.inflight})

	// The stop's clock starts with the stop signal, even if it arrives
	// while start is still recovering volumes.
	signalled := make(chan time.Time, 1)
	defer context.AfterFunc(ctx, func() { signalled <- time.Now() })()

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
	clock := newStopClock(signalled, d.opts.StopTimeout)
	d.stopServer(srv, clock)
	stopErr := d.shutdown(clock)
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

// recoverPanics turns a panic in a handler into an Internal error for that
// call instead of a crash of the node's data path: the FUSE server, every
// staged volume and every frozen filesystem live in this process. The
// handler's deferred cleanups (thaws, in-flight marks) have run by then.
func recoverPanics(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
	defer func() {
		if r := recover(); r != nil {
			klog.ErrorS(fmt.Errorf("panic: %v", r), "Recovered a panic in a gRPC handler", "method", info.FullMethod, "stack", string(debug.Stack()))
			resp, err = nil, status.Errorf(codes.Internal, "internal error in %s: %v", info.FullMethod, r)
		}
	}()
	return handler(ctx, req)
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
