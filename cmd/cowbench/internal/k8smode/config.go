// Package k8smode benchmarks snapshots through Kubernetes, as a user of a
// cluster sees them: in a namespace of its own it creates PVCs, takes
// VolumeSnapshots of them and restores and clones them into new PVCs, and
// times each from the create call until the object is ready (readyToUse,
// Bound) or, for deletes, gone, by watching the objects. Everything it
// created is deleted at the end, also on Ctrl-C or --timeout.
package k8smode

import (
	"errors"
	"fmt"
	"time"

	"github.com/cowcsi/cowcsi/cmd/cowbench/internal/bench"
)

// Config is what a run measures and where.
type Config struct {
	Kubeconfig string // empty: $KUBECONFIG, then ~/.kube/config, then in-cluster
	Context    string

	StorageClass  string
	SnapshotClass string
	// Node is set as the volume.kubernetes.io/selected-node annotation of
	// every claim, the scheduler's pick: it lets claims of a
	// WaitForFirstConsumer class bind without a pod.
	Node string
	// WriterPod writes Write bytes into each source volume from a pod
	// (WriterImage) before its snapshots.
	WriterPod   bool
	WriterImage string
	Write       int64

	bench.Plan // Access becomes the claims' volumeMode

	// NamespacePrefix starts the generated namespace name.
	NamespacePrefix string
	ConnectTimeout  time.Duration
	OpTimeout       time.Duration
	CleanupTimeout  time.Duration
}

// Validate checks the configuration before the cluster is contacted.
func (c *Config) Validate() error {
	var errs []error
	if c.StorageClass == "" {
		errs = append(errs, errors.New("--storage-class is required"))
	}
	if c.SnapshotClass == "" {
		errs = append(errs, errors.New("--snapshot-class is required"))
	}
	errs = append(errs, c.Plan.Validate()...)
	if c.Write > 0 && !c.WriterPod {
		errs = append(errs, errors.New("--write needs --writer-pod: in k8s mode the data is written by a pod"))
	}
	if c.WriterPod && c.Write <= 0 {
		errs = append(errs, errors.New("--writer-pod needs --write SIZE"))
	}
	for _, s := range c.Sizes {
		if c.Write > s*3/4 {
			errs = append(errs, fmt.Errorf("--write %d bytes is more than 3/4 of the %d-byte volumes", c.Write, s))
			break
		}
	}
	return errors.Join(errs...)
}
