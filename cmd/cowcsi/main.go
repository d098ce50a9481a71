// Command cowcsi is the cowcsi CSI plugin: Identity, Controller and Node
// services for node-local copy-on-write volumes.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"k8s.io/klog/v2"

	"github.com/cowcsi/cowcsi/driver"
)

// version is set at build time: -ldflags "-X main.version=v1.2.3".
var version = "dev"

func main() {
	os.Exit(run(os.Args[1:]))
}

// newFlagSet registers the command's flags: opts' fields, klog's, and
// --version.
func newFlagSet(opts *driver.Options) (fs *flag.FlagSet, showVersion *bool) {
	fs = flag.NewFlagSet("cowcsi", flag.ContinueOnError)
	klog.InitFlags(fs)
	opts.AddFlags(fs)
	showVersion = fs.Bool("version", false, "print the version and exit")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: cowcsi --nodeid=NODE [flags]\n\nFlags:\n")
		fs.PrintDefaults()
	}
	return fs, showVersion
}

func run(args []string) int {
	opts := driver.DefaultOptions()
	opts.Version = version
	fs, showVersion := newFlagSet(&opts)
	if err := fs.Parse(args); err != nil {
		if err == flag.ErrHelp {
			return 0
		}
		return 2 // the flag package has printed the problem and the usage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "cowcsi: unexpected arguments: %q\n", fs.Args())
		return 2
	}
	if *showVersion {
		fmt.Printf("cowcsi %s\n", version)
		return 0
	}
	defer klog.Flush()
	if err := opts.Validate(); err != nil {
		fmt.Fprintf(os.Stderr, "cowcsi: invalid flags:\n%v\n", err)
		return 2
	}
	d, err := driver.New(opts, driver.DefaultDeps())
	if err != nil {
		fmt.Fprintf(os.Stderr, "cowcsi: %v\n", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := d.Run(ctx); err != nil {
		klog.ErrorS(err, "cowcsi failed")
		return 1
	}
	return 0
}
