package e2e

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/cowcsi/cowcsi/cow/loopdev"
	"github.com/cowcsi/cowcsi/test/testutil"
)

// releaseUnder unmounts everything below dir and detaches the loop devices
// backed by files below it, so dir can be removed. It returns what it had to
// release, for the log: after a clean run that is only the etcd tmpfs.
func releaseUnder(dir string) ([]string, error) {
	var released []string
	var errs []error
	unmount := func() {
		mps, err := testutil.MountsUnder(dir)
		if err != nil {
			errs = append(errs, err)
			return
		}
		for _, mp := range mps {
			if err := syscall.Unmount(mp, 0); err != nil {
				// Busy or a dead FUSE server: detach it lazily.
				if err := syscall.Unmount(mp, syscall.MNT_DETACH); err != nil {
					errs = append(errs, fmt.Errorf("unmount %s: %w", mp, err))
					continue
				}
			}
			released = append(released, "mount "+mp)
		}
	}
	// Filesystems on loop devices first, then the loops, then what is left
	// (the FUSE filesystems the loops' files live in).
	unmount()
	loops, err := loopdev.BindingsUnder(dir)
	if err != nil {
		errs = append(errs, err)
	}
	for _, l := range loops {
		if err := loopdev.ClearFD(l.Path); err != nil {
			errs = append(errs, err)
			continue
		}
		released = append(released, "loop "+l.Path)
	}
	unmount()
	return released, errors.Join(errs...)
}

// sweepStale releases and removes the work directories of earlier runs
// whose test process is gone (killed by a timeout, say). A directory of a
// run still going (another `go test` on this machine) is left alone.
func sweepStale(base string) {
	dirs, _ := filepath.Glob(filepath.Join(base, "cowcsi-e2e-*"))
	for _, d := range dirs {
		data, err := os.ReadFile(filepath.Join(d, "pid"))
		if err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(data))); err == nil && syscall.Kill(pid, 0) == nil {
				continue
			}
		}
		if released, err := releaseUnder(d); err != nil {
			fmt.Fprintf(os.Stderr, "e2e: sweeping %s: %v\n", d, err)
			continue
		} else if len(released) > 0 {
			fmt.Fprintf(os.Stderr, "e2e: swept a stale run: %s\n", strings.Join(released, ", "))
		}
		// A run that kept its directory for the logs says so.
		if _, err := os.Stat(filepath.Join(d, "kept")); err == nil {
			continue
		}
		_ = os.RemoveAll(d)
	}
}
