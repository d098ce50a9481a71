package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync/atomic"
	"time"

	"github.com/cowcsi/cowcsi/cmd/cowbench/internal/k8smode"
)

func runK8s(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs, c := newFlags("k8s", "1Gi,16Gi")
	cfg := k8smode.Config{}
	var write quantity
	fs.StringVar(&cfg.Kubeconfig, "kubeconfig", "", "kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster)")
	fs.StringVar(&cfg.Context, "context", "", "kubeconfig context (default: the current one)")
	fs.StringVar(&cfg.StorageClass, "storage-class", "", "StorageClass of the claims (required)")
	fs.StringVar(&cfg.SnapshotClass, "snapshot-class", "", "VolumeSnapshotClass of the snapshots (required)")
	fs.StringVar(&cfg.Node, "node", "", "node to put the volumes on: the volume.kubernetes.io/selected-node annotation the scheduler would set, so claims of a WaitForFirstConsumer class bind without a pod")
	fs.BoolVar(&cfg.WriterPod, "writer-pod", false, "write --write bytes into each source volume from a pod, which stays running while the volume is snapshotted")
	fs.StringVar(&cfg.WriterImage, "writer-image", "busybox:1.37", "image of the writer pods (needs sh, dd, test, sleep)")
	fs.Var(&write, "write", "data each writer pod writes (with --writer-pod)")
	fs.StringVar(&cfg.NamespacePrefix, "namespace-prefix", "cowbench-", "start of the generated name of the namespace cowbench works in")
	fs.DurationVar(&cfg.ConnectTimeout, "connect-timeout", 30*time.Second, "how long to wait for the API server, and for the first list of each watched kind")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: cowbench k8s --storage-class X --snapshot-class Y [--node NAME | --writer-pod --write SIZE] [flags]\n\n"+
			"Measures, in a namespace of its own that it deletes at the end: VolumeSnapshot create -> readyToUse,\n"+
			"restore PVC create -> Bound, clone PVC create -> Bound, VolumeSnapshot delete -> gone, PVC delete -> PV gone.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if code, ok := parse(fs, args, stderr); !ok {
		return code
	}
	cfg.Plan, cfg.Write = c.plan(), int64(write)
	cfg.OpTimeout, cfg.CleanupTimeout = c.opTimeout, c.cleanupTimeout
	if err := cfg.Validate(); err != nil {
		fmt.Fprintf(stderr, "cowbench k8s: %v\n", err)
		return exitSetup
	}
	ctx, cancel := withTimeout(ctx, c.timeout)
	defer cancel()
	var ns atomic.Value
	ns.Store("")
	leftHint = func() string {
		if n := ns.Load().(string); n != "" {
			return fmt.Sprintf("; namespace %s and what is in it are left: kubectl delete namespace %s", n, n)
		}
		return ""
	}
	res, err := k8smode.Run(ctx, cfg, newProgress(stderr, c.quiet), func(n string) { ns.Store(n) })
	noResult := exitFailed // the run failed after it started
	if errors.Is(err, k8smode.ErrSetup) {
		noResult = exitSetup
	}
	return finish(res, err, noResult, c, stdout, stderr, "cowbench k8s")
}
