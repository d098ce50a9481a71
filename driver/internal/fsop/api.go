package fsop

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"time"
)

// Flush fsyncs the loop device dev: its dirty pages go down to the backing
// FUSE file, which the loop driver then fsyncs.
func Flush(ctx context.Context, dev string) error {
	_, err := run(ctx, request{Op: opFlush, Device: dev})
	return err
}

// SyncFS syncs the filesystem mounted at path (syncfs(2)).
func SyncFS(ctx context.Context, path string) error {
	_, err := run(ctx, request{Op: opSyncFS, Path: path})
	return err
}

// Probe reads the first block of the file at path.
func Probe(ctx context.Context, path string) error {
	_, err := run(ctx, request{Op: opProbe, Path: path})
	return err
}

// StatSize returns the size the kernel reports for the file at path.
func StatSize(ctx context.Context, path string) (int64, error) {
	s, err := run(ctx, request{Op: opStatSize, Path: path})
	if err != nil {
		return 0, err
	}
	return strconv.ParseInt(s, 10, 64)
}

// Attach binds backing to a free loop device (4096-byte logical blocks,
// direct I/O when the kernel accepts it, no autoclear) and returns the
// device path.
func Attach(ctx context.Context, backing string, readOnly bool) (string, error) {
	return run(ctx, request{Op: opAttach, Path: backing, ReadOnly: readOnly})
}

// Resize makes the loop device dev pick up its backing file's size.
func Resize(ctx context.Context, dev string) error {
	_, err := run(ctx, request{Op: opResize, Device: dev})
	return err
}

// Detach unbinds the loop device dev if it is still bound to backing (to
// anything, if backing is empty); a device that is gone or bound to
// another file is left alone. deferred reports a device still open
// elsewhere, which the kernel detaches on its last close.
func Detach(ctx context.Context, dev, backing string) (deferred bool, err error) {
	s, err := run(ctx, request{Op: opDetach, Device: dev, Path: backing})
	return s == detachDeferred, err
}

// Thaw thaws the filesystem on device number dev reached through the first
// of paths that is on it, if it is frozen. It returns what it did.
func Thaw(ctx context.Context, paths []string, dev uint64) (string, error) {
	return run(ctx, request{Op: opThaw, Paths: paths, Dev: dev})
}

// Freeze is a child process that freezes a filesystem and holds it.
type Freeze struct {
	c *child
	// State is what the child reported: StateFrozen, StateBusy or
	// StateSynced.
	State string

	once    sync.Once
	thawErr error
}

// StartFreeze starts a child that freezes the filesystem at path, which
// must be on the loop device dev (else it fails wrapping ErrNotMounted and
// nothing is frozen), and flushes dev. It returns once the child reports.
// The child thaws when Thaw is called, when window (counted from its
// start) ends, or when the driver dies.
//
// A non-nil *Freeze comes back whenever a child was started, error or
// not: its Exited tells when the child is gone, and Clean whether it
// left nothing frozen. If ctx ends first, the child is told to stop (it
// thaws a freeze that completes later) and the error wraps ctx.Err().
func StartFreeze(ctx context.Context, path, dev string, window time.Duration) (*Freeze, error) {
	c, err := start(request{Op: opFreeze, Path: path, Device: dev, Window: window})
	if err != nil {
		return nil, err
	}
	f := &Freeze{c: c}
	select {
	case r, ok := <-c.replies:
		if !ok {
			return f, c.gone(opFreeze)
		}
		if err := r.err(); err != nil {
			return f, c.reaped(ctx, err)
		}
		f.State = r.State
		if f.State != StateFrozen {
			return f, c.reaped(ctx, nil)
		}
		return f, nil
	case <-ctx.Done():
		c.closeStdin()
		return f, fmt.Errorf("freeze %s: %w", path, ctx.Err())
	}
}

// Thaw asks the child to thaw and waits for its answer and its exit, at
// most until ctx ends. It returns ErrExpired if the child had thawed by itself at the end
// of its window: what was done in between may have run unfrozen. It is
// idempotent, and a no-op for a filesystem the child did not freeze.
func (f *Freeze) Thaw(ctx context.Context) error {
	f.once.Do(func() { f.thawErr = f.thaw(ctx) })
	return f.thawErr
}

func (f *Freeze) thaw(ctx context.Context) error {
	defer f.c.closeStdin()
	if f.State != StateFrozen {
		return nil
	}
	// A failed write means the child is gone; its replies say why.
	_, _ = f.c.stdin.Write([]byte("thaw\n"))
	select {
	case r, ok := <-f.c.replies:
		if !ok {
			return f.c.gone("thaw")
		}
		return f.c.reaped(ctx, r.err())
	case <-ctx.Done():
		return fmt.Errorf("thaw: %w", ctx.Err())
	}
}

// Pid is the child's process ID.
func (f *Freeze) Pid() int { return f.c.Pid() }

// Exited is closed once the child has exited.
func (f *Freeze) Exited() <-chan struct{} { return f.c.exited }

// Clean reports, once Exited is closed, whether the child exited normally
// having left nothing frozen. Otherwise (killed, or a failed thaw) the
// filesystem may still be frozen.
func (f *Freeze) Clean() bool {
	<-f.c.exited
	return f.c.waitErr == nil
}
