package main

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/cowcsi/cowcsi/cmd/cowbench/internal/csimode"
)

func runCSI(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs, c := newFlags("csi", "1Gi,16Gi,256Gi")
	cfg := csimode.Config{Online: true, ReadyPoll: 100 * time.Millisecond}
	write := quantity(64 << 20)
	var params, snapParams keyValues
	fs.StringVar(&cfg.Endpoint, "endpoint", "", "the driver's CSI endpoint: unix:///path/csi.sock, /path/csi.sock or tcp://host:port (none: --start-driver)")
	fs.BoolVar(&cfg.StartDriver, "start-driver", false, "start cowcsi on a temporary store and measure it (the default without --endpoint; needs root)")
	fs.StringVar(&cfg.CowcsiPath, "cowcsi", "", "the cowcsi binary for --start-driver (default: next to cowbench, then $PATH)")
	fs.StringVar(&cfg.WorkDir, "work-dir", "", "directory for the started driver's store, socket and log and for staging paths (default: a temporary one under /var/tmp, removed afterwards)")
	fs.StringVar(&cfg.StagingDir, "staging-dir", "", "kubelet root the staging and publish paths go under, as the kubelet lays them out; a driver in a container needs one it sees, e.g. /var/lib/kubelet (default: <work-dir>/kubelet)")
	fs.Var(&write, "write", "data written to each source volume before its snapshots (0: none, no node calls)")
	fs.StringVar(&cfg.FsType, "fs-type", "", "filesystem for --access mount (default: the driver's)")
	fs.BoolVar(&cfg.Online, "online", true, "take snapshots while the volumes are staged and published, as with a running pod; false: unpublish and unstage first")
	fs.Var(&params, "parameters", "CreateVolume parameters, k=v,k2=v2 (as a StorageClass's)")
	fs.Var(&snapParams, "snapshot-parameters", "CreateSnapshot parameters, k=v (as a VolumeSnapshotClass's), e.g. cowcsi.io/freeze=false")
	fs.DurationVar(&cfg.ConnectTimeout, "connect-timeout", 30*time.Second, "how long to wait for the driver to answer Probe with ready")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: cowbench csi [--endpoint unix:///path/csi.sock | --start-driver] [flags]\n\n"+
			"Measures CreateSnapshot (until ready to use), restore (CreateVolume from a snapshot), clone\n"+
			"(CreateVolume from a volume), DeleteSnapshot and DeleteVolume through the driver's CSI API.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if code, ok := parse(fs, args, stderr); !ok {
		return code
	}
	if cfg.Endpoint == "" && !cfg.StartDriver {
		cfg.StartDriver = true
		if !c.quiet {
			fmt.Fprintln(stderr, "cowbench csi: no --endpoint: starting cowcsi on a temporary store (--start-driver)")
		}
	}
	cfg.Plan, cfg.Write = c.plan(), int64(write)
	cfg.Parameters, cfg.SnapshotParameters = params, snapParams
	cfg.OpTimeout, cfg.CleanupTimeout = c.opTimeout, c.cleanupTimeout
	if err := cfg.Validate(); err != nil {
		fmt.Fprintf(stderr, "cowbench csi: %v\n", err)
		return exitSetup
	}
	ctx, cancel := withTimeout(ctx, c.timeout)
	defer cancel()
	res, err := csimode.Run(ctx, cfg, newProgress(stderr, c.quiet))
	return finish(res, err, exitSetup, c, stdout, stderr, "cowbench csi")
}
