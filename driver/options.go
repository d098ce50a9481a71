package driver

import (
	"errors"
	"flag"
	"fmt"
	"net/url"
	"path/filepath"
	"strings"
	"time"
)

const (
	// DefaultDriverName is the CSI driver name (CSIDriver object, StorageClass provisioner).
	DefaultDriverName = "cowcsi.io"
	// TopologyKey is the topology segment that pins a volume to its node.
	TopologyKey = "topology.cowcsi.io/node"
	// DefaultStoreDir is where the engine, the FUSE mount and the node state live.
	DefaultStoreDir = "/var/lib/cowcsi"
	// DefaultEndpoint is where the kubelet and the sidecars expect the socket.
	DefaultEndpoint = "unix:///csi/csi.sock"
)

// Options configures a Driver. The zero value is not valid: use
// DefaultOptions, then AddFlags or set fields, then Validate.
type Options struct {
	// Endpoint is the gRPC listen address, unix:///path/to/socket.
	Endpoint string
	// NodeID is this node's name as the CO knows it (Kubernetes node name).
	NodeID string
	// StoreDir holds the engine, the FUSE mount point and the node state.
	StoreDir string
	// FuseDir is where the FUSE filesystem is mounted; empty means StoreDir/fuse.
	FuseDir string
	// DriverName is reported by GetPluginInfo.
	DriverName string
	// Version is reported by GetPluginInfo.
	Version string
	// SocketGroupAccess makes the socket mode 0660 instead of 0600.
	SocketGroupAccess bool
	// MaxVolumesPerNode is reported by NodeGetInfo; 0 means no limit.
	MaxVolumesPerNode int64
	// DefaultVolumeSize is used when CreateVolume has no capacity range.
	DefaultVolumeSize int64
	// FreezeTimeout bounds the whole frozen window of a snapshot or clone
	// (FIFREEZE, the loop flush, the engine's cut); past it the filesystem
	// is thawed and the call fails.
	FreezeTimeout time.Duration
	// StopTimeout bounds the graceful gRPC stop; in-flight calls are
	// cancelled after it.
	StopTimeout time.Duration
	// FuseIOURing selects how the kernel's FUSE requests reach the driver:
	// FUSE over io_uring (fast, Linux 6.14+) or /dev/fuse. See the
	// FuseIOURing* constants.
	FuseIOURing string
}

// FuseIOURing values.
const (
	// FuseIOURingAuto turns on the fuse module's enable_uring parameter
	// if it can and uses the ring when the kernel offers it, /dev/fuse
	// otherwise.
	FuseIOURingAuto = "auto"
	// FuseIOURingOn is auto, but the driver does not start without it.
	FuseIOURingOn = "on"
	// FuseIOURingOff always uses /dev/fuse.
	FuseIOURingOff = "off"
)

// DefaultOptions returns the options the binary starts from.
func DefaultOptions() Options {
	return Options{
		Endpoint:          DefaultEndpoint,
		StoreDir:          DefaultStoreDir,
		DriverName:        DefaultDriverName,
		Version:           "dev",
		DefaultVolumeSize: 1 << 30,
		FreezeTimeout:     10 * time.Second,
		StopTimeout:       30 * time.Second,
		FuseIOURing:       FuseIOURingAuto,
	}
}

// AddFlags registers the options on fs, with o's current values as defaults.
func (o *Options) AddFlags(fs *flag.FlagSet) {
	fs.StringVar(&o.Endpoint, "endpoint", o.Endpoint, "CSI endpoint, unix:///path/to/csi.sock")
	fs.StringVar(&o.NodeID, "nodeid", o.NodeID, "this node's ID (the Kubernetes node name); required")
	fs.StringVar(&o.StoreDir, "store-dir", o.StoreDir, "directory holding the volume store, the FUSE mount point and the node state")
	fs.StringVar(&o.FuseDir, "fuse-dir", o.FuseDir, "where to mount the driver's FUSE filesystem (default <store-dir>/fuse)")
	fs.StringVar(&o.DriverName, "driver-name", o.DriverName, "CSI driver name")
	fs.BoolVar(&o.SocketGroupAccess, "socket-group-access", o.SocketGroupAccess, "create the socket with mode 0660 instead of 0600")
	fs.Int64Var(&o.MaxVolumesPerNode, "max-volumes-per-node", o.MaxVolumesPerNode, "volume limit reported to the CO; 0 means no limit")
	fs.Int64Var(&o.DefaultVolumeSize, "default-volume-size", o.DefaultVolumeSize, "size in bytes of a volume created without a capacity range")
	fs.DurationVar(&o.FreezeTimeout, "freeze-timeout", o.FreezeTimeout, "bound on the frozen window of a snapshot: freeze, loop flush and cut")
	fs.DurationVar(&o.StopTimeout, "stop-timeout", o.StopTimeout, "bound on the graceful stop of the gRPC server")
	fs.StringVar(&o.FuseIOURing, "fuse-io-uring", o.FuseIOURing, "serve the volumes' FUSE file through FUSE over io_uring: auto (if the kernel has it; turns on the fuse module's enable_uring), on (required), off (/dev/fuse)")
}

// Validate checks the options and returns every problem found.
func (o *Options) Validate() error {
	var errs []error
	if _, err := socketPath(o.Endpoint); err != nil {
		errs = append(errs, err)
	}
	if o.NodeID == "" {
		errs = append(errs, errors.New("--nodeid is required"))
	} else if len(o.NodeID) > 128 || strings.ContainsAny(o.NodeID, "\x00\n") {
		errs = append(errs, fmt.Errorf("--nodeid %q: at most 128 characters, no control characters", o.NodeID))
	}
	if o.StoreDir == "" || !filepath.IsAbs(o.StoreDir) {
		errs = append(errs, fmt.Errorf("--store-dir %q must be an absolute path", o.StoreDir))
	}
	if o.FuseDir != "" && !filepath.IsAbs(o.FuseDir) {
		errs = append(errs, fmt.Errorf("--fuse-dir %q must be an absolute path", o.FuseDir))
	}
	if o.DriverName == "" || len(o.DriverName) > 63 {
		errs = append(errs, fmt.Errorf("--driver-name %q must be 1..63 characters", o.DriverName))
	}
	if o.MaxVolumesPerNode < 0 {
		errs = append(errs, fmt.Errorf("--max-volumes-per-node %d must not be negative", o.MaxVolumesPerNode))
	}
	if o.DefaultVolumeSize <= 0 || o.DefaultVolumeSize > maxVolumeSize {
		errs = append(errs, fmt.Errorf("--default-volume-size %d must be in 1..%d", o.DefaultVolumeSize, int64(maxVolumeSize)))
	}
	if o.FreezeTimeout <= 0 {
		errs = append(errs, fmt.Errorf("--freeze-timeout %v must be positive", o.FreezeTimeout))
	}
	if o.StopTimeout <= 0 {
		errs = append(errs, fmt.Errorf("--stop-timeout %v must be positive", o.StopTimeout))
	}
	switch o.FuseIOURing {
	case FuseIOURingAuto, FuseIOURingOn, FuseIOURingOff:
	default:
		errs = append(errs, fmt.Errorf("--fuse-io-uring %q must be auto, on or off", o.FuseIOURing))
	}
	return errors.Join(errs...)
}

func (o *Options) fuseDir() string {
	if o.FuseDir != "" {
		return o.FuseDir
	}
	return filepath.Join(o.StoreDir, "fuse")
}

func (o *Options) engineDir() string { return filepath.Join(o.StoreDir, "engine") }

func (o *Options) stateDir() string { return filepath.Join(o.StoreDir, "node") }

// socketPath returns the filesystem path of a unix:// endpoint. Only unix
// sockets are supported: the kubelet and the sidecars talk to the plugin
// through a socket on a shared host path.
func socketPath(endpoint string) (string, error) {
	u, err := url.Parse(endpoint)
	if err != nil {
		return "", fmt.Errorf("--endpoint %q: %w", endpoint, err)
	}
	if u.Scheme != "unix" {
		return "", fmt.Errorf("--endpoint %q: only unix:///path endpoints are supported", endpoint)
	}
	p := u.Path
	if p == "" {
		p = u.Opaque // unix:relative or unix:/abs written without slashes
	}
	if u.Host != "" || !filepath.IsAbs(p) {
		return "", fmt.Errorf("--endpoint %q: want unix:///absolute/path", endpoint)
	}
	return filepath.Clean(p), nil
}
