// Command cowbench measures snapshot latency of a CSI driver: through its
// CSI gRPC API (cowbench csi), or through Kubernetes (cowbench k8s), at
// several volume sizes and concurrency levels, and reports p50/p90/p99/max
// per operation as a table, JSON, CSV and a plot. See docs/COWBENCH.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"golang.org/x/term"

	"github.com/cowcsi/cowcsi/cmd/cowbench/internal/bench"
	"github.com/cowcsi/cowcsi/cmd/cowbench/internal/report"
)

// Exit codes.
const (
	exitOK     = 0
	exitFailed = 1 // operations failed, the run was interrupted, or cleanup failed
	exitSetup  = 2 // bad flags, or the run could not start (driver unreachable, capability or class missing)
)

// version is set at build time: -ldflags "-X main.version=v1.2.3".
var version = "dev"

const usage = `cowbench measures how long snapshots, restores and clones take.

Usage:
  cowbench csi [flags]    through the CSI gRPC API of a driver (--endpoint), or of a
                          cowcsi it starts on a temporary store (--start-driver, the default)
  cowbench k8s [flags]    through Kubernetes: VolumeSnapshots and PVCs in a namespace of its own
  cowbench version

Run "cowbench csi -h" or "cowbench k8s -h" for the flags. docs/COWBENCH.md has examples.
`

func main() {
	ctx, cancel := context.WithCancelCause(context.Background())
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		s := <-sigs
		fmt.Fprintf(os.Stderr, "\ncowbench: %s: stopping; cleaning up what was created (again to abandon the cleanup)\n", signalName(s))
		cancel(fmt.Errorf("interrupted (%s)", signalName(s)))
		// A signal sent to the process and its group at once (timeout(1)
		// does that) arrives twice: only a later one means "again".
		first := time.Now()
		for s = <-sigs; time.Since(first) < time.Second; s = <-sigs {
		}
		fmt.Fprintf(os.Stderr, "cowbench: %s again: exiting without finishing the cleanup%s\n", signalName(s), leftHint())
		os.Exit(130)
	}()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

func signalName(s os.Signal) string {
	switch s {
	case os.Interrupt:
		return "SIGINT, Ctrl-C"
	case syscall.SIGTERM:
		return "SIGTERM"
	}
	return s.String()
}

// leftHint says what an abandoned cleanup leaves; the k8s mode sets it to
// its namespace.
var leftHint = func() string { return "" }

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return exitSetup
	}
	switch args[0] {
	case "csi":
		return runCSI(ctx, args[1:], stdout, stderr)
	case "k8s":
		return runK8s(ctx, args[1:], stdout, stderr)
	case "version", "--version", "-version":
		fmt.Fprintf(stdout, "cowbench %s\n", version)
		return exitOK
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return exitOK
	}
	fmt.Fprintf(stderr, "cowbench: unknown command %q\n\n%s", args[0], usage)
	return exitSetup
}

// parse parses a mode's flags; it returns an exit code when the run must
// not go on (help asked for, bad flags).
func parse(fs *flag.FlagSet, args []string, stderr io.Writer) (int, bool) {
	fs.SetOutput(stderr)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK, false
		}
		return exitSetup, false
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "cowbench %s: unexpected arguments: %q\n", fs.Name(), fs.Args())
		return exitSetup, false
	}
	return 0, true
}

// withTimeout applies --timeout to ctx.
func withTimeout(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	if d <= 0 {
		return context.WithCancel(ctx)
	}
	return context.WithTimeoutCause(ctx, d, fmt.Errorf("--timeout %v reached", d))
}

// newProgress shows progress on stderr: a bar on a terminal, plain lines
// otherwise, nothing with --quiet.
func newProgress(stderr io.Writer, quiet bool) *bench.Progress {
	if quiet {
		return nil
	}
	tty, width := false, 0
	if f, ok := stderr.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		tty = true
		if w, _, err := term.GetSize(int(f.Fd())); err == nil {
			width = w
		}
	}
	return bench.NewProgress(stderr, tty, width, 0)
}

// finish writes the result in every format asked for and returns the exit
// code: runErr is what went wrong besides failed operations (cleanup).
// Without a result (the run did not start) it reports runErr and returns
// noResult.
func finish(res *bench.Result, runErr error, noResult int, c *common, stdout, stderr io.Writer, prefix string) int {
	if res == nil {
		if runErr == nil {
			runErr = errors.New("no result")
		}
		fmt.Fprintf(stderr, "%s: %v\n", prefix, runErr)
		return noResult
	}
	code := exitOK
	for _, o := range c.outputs {
		if err := writeOutput(res, o, stdout); err != nil {
			fmt.Fprintf(stderr, "%s: --output %s: %v\n", prefix, o.format, err)
			code = exitFailed
		}
	}
	if c.plot != "" {
		if err := report.Plot(c.plot, res); err != nil {
			fmt.Fprintf(stderr, "%s: --plot: %v\n", prefix, err)
			code = exitFailed
		}
	}
	if res.Failed() {
		n := 0
		for _, r := range res.Rows {
			n += r.Errors
		}
		noun := "operations"
		if n == 1 {
			noun = "operation"
		}
		fmt.Fprintf(stderr, "%s: %d %s failed\n", prefix, n, noun)
		code = exitFailed
	}
	if res.Interrupted != "" {
		fmt.Fprintf(stderr, "%s: the run did not complete: %s\n", prefix, res.Interrupted)
		code = exitFailed
	}
	if runErr != nil {
		fmt.Fprintf(stderr, "%s: %v\n", prefix, runErr)
		code = exitFailed
	}
	return code
}

func writeOutput(res *bench.Result, o output, stdout io.Writer) (err error) {
	w := stdout
	if o.path != "" {
		f, err := os.Create(o.path)
		if err != nil {
			return err
		}
		defer func() {
			if cerr := f.Close(); err == nil {
				err = cerr
			}
		}()
		w = f
	}
	switch o.format {
	case "json":
		return report.JSON(w, res)
	case "csv":
		return report.CSV(w, res)
	}
	return report.Table(w, res)
}
