package driver

import (
	"errors"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// The driver serves the files under its own loop devices. If memory
// reclaim in one of its threads waited for writeback to those devices, it
// would wait for itself. PR_SET_IO_FLUSHER (as nbd and ublk servers set)
// makes the kernel reclaim without I/O for this process (PF_MEMALLOC_NOIO)
// and not throttle it behind other devices' dirty pages. The flag is per
// thread and inherited by new threads, so it is set on every thread at
// once; it needs CAP_SYS_RESOURCE.

var ioFlusherOnce sync.Once

// becomeIOFlusher sets PR_SET_IO_FLUSHER on every thread of the process,
// once, and logs the outcome; without it the driver still works, with the
// reclaim risk above.
func becomeIOFlusher() {
	ioFlusherOnce.Do(func() {
		err := setIOFlusher()
		switch {
		case err == nil:
			klog.InfoS("Marked the process as an I/O flusher (PR_SET_IO_FLUSHER)")
		case errors.Is(err, unix.EPERM):
			klog.InfoS("Not an I/O flusher: PR_SET_IO_FLUSHER needs CAP_SYS_RESOURCE; memory reclaim in the driver may wait on its own volumes")
		default:
			klog.ErrorS(err, "Not an I/O flusher: PR_SET_IO_FLUSHER failed")
		}
	})
}

// setIOFlusher runs prctl(PR_SET_IO_FLUSHER, 1) on every thread. Go does
// this only in binaries without cgo (ENOTSUP otherwise); the driver binary
// is built with CGO_ENABLED=0.
func setIOFlusher() error {
	_, _, errno := syscall.AllThreadsSyscall(syscall.SYS_PRCTL, unix.PR_SET_IO_FLUSHER, 1, 0)
	if errno != 0 {
		return errno
	}
	return nil
}
