// Package csimode benchmarks a CSI driver through its gRPC API, as the CSI
// sidecars and the kubelet call it: CreateVolume, NodeStage/NodePublish and
// a write of real data, CreateSnapshot (until ready to use), CreateVolume
// from a snapshot (restore) and from a volume (clone), DeleteSnapshot and
// DeleteVolume, at several volume sizes and concurrency levels.
package csimode

import (
	"errors"
	"fmt"
	"time"

	"github.com/cowcsi/cowcsi/cmd/cowbench/internal/bench"
)

// Config is what a run measures and against what.
type Config struct {
	// Endpoint of the driver: unix:///path/csi.sock, /path/csi.sock, or
	// tcp://host:port. Empty with StartDriver.
	Endpoint string
	// StartDriver starts cowcsi on a temporary store (in WorkDir) and
	// benchmarks it.
	StartDriver bool
	CowcsiPath  string // the cowcsi binary; default: next to cowbench, then $PATH
	// WorkDir holds what cowbench makes on this machine: the started
	// driver's store, socket and log, and the kubelet-like staging and
	// publish paths (unless StagingDir is set). Default: a new directory
	// under /var/tmp, removed afterwards.
	WorkDir string
	// StagingDir is the kubelet root directory the staging and target paths
	// go under (plugins/kubernetes.io/csi/..., pods/...). A driver in a
	// container needs paths it sees, such as /var/lib/kubelet.
	StagingDir string

	bench.Plan        // Clone is honoured when the driver can clone
	Write      int64  // bytes written to each source volume before its snapshots
	FsType     string // for mount access; empty: the driver's default
	// Online takes the snapshots while the source volumes are staged and
	// published, as with a running pod; otherwise they are unpublished and
	// unstaged first.
	Online             bool
	Parameters         map[string]string
	SnapshotParameters map[string]string

	ConnectTimeout time.Duration // to reach the driver and see it ready
	OpTimeout      time.Duration // per operation
	CleanupTimeout time.Duration
	// ReadyPoll is the first interval between CreateSnapshot calls while a
	// snapshot is not ready to use (doubling, as csi-snapshotter backs off).
	ReadyPoll time.Duration
}

// Validate checks the configuration before anything is created.
func (c *Config) Validate() error {
	var errs []error
	if c.Endpoint == "" && !c.StartDriver {
		errs = append(errs, errors.New("--endpoint or --start-driver is required"))
	}
	if c.Endpoint != "" && c.StartDriver {
		errs = append(errs, errors.New("--endpoint and --start-driver exclude each other"))
	}
	errs = append(errs, c.Plan.Validate()...)
	if c.Write < 0 {
		errs = append(errs, errors.New("--write must not be negative"))
	}
	if c.Write > 0 {
		smallest := c.Sizes[0]
		for _, s := range c.Sizes {
			smallest = min(smallest, s)
		}
		limit, what := smallest, "the smallest volume"
		if c.Access == bench.AccessMount {
			// A filesystem keeps some of the volume for itself.
			limit, what = smallest*3/4, "3/4 of the smallest volume (the filesystem needs the rest)"
		}
		if c.Write > limit {
			errs = append(errs, fmt.Errorf("--write %d bytes is more than %s", c.Write, what))
		}
	}
	return errors.Join(errs...)
}
