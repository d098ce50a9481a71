package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"k8s.io/klog/v2"

	"github.com/cowcsi/cowcsi/driver/internal/fsop"
)

// The stop sequence runs on one clock that starts when the driver is told
// to stop (SIGTERM): the kubelet kills the container terminationGracePeriod
// after that, and deploy/ sets that period above StopTimeout. Each phase
// ends at a fixed share of StopTimeout, so that a slow phase takes time
// from itself only:
//
//	0 .. 1/2   graceful gRPC stop: in-flight calls (a snapshot's freeze)
//	           finish; then they are cancelled
//	.. 5/8     the cancelled calls' handlers return
//	.. 7/8     staged volumes are synced and flushed, in parallel
//	.. 1       node state saved, store closed, FUSE filesystem unmounted
//
// A phase that overruns its end is left behind, not waited for. That is
// safe: the engine acknowledges a write (fsync, FUSE FLUSH) only once it is
// durable, so an unfinished sync loses only writes nobody was told are
// durable, exactly as a crash would, and the engine recovers from a crash.

// stopClock is the stop sequence's schedule.
type stopClock struct {
	start time.Time
	total time.Duration
}

// newStopClock starts the clock at the time received from signalled, if
// any (the stop signal came before this point), else now.
func newStopClock(signalled <-chan time.Time, total time.Duration) stopClock {
	select {
	case t := <-signalled:
		return stopClock{start: t, total: total}
	default:
		return stopClock{start: time.Now(), total: total}
	}
}

// at is the point num/8 of the way through StopTimeout.
func (c stopClock) at(eighths int) time.Time {
	return c.start.Add(c.total * time.Duration(eighths) / 8)
}

func (c stopClock) graceEnd() time.Time { return c.at(4) }
func (c stopClock) drainEnd() time.Time { return c.at(5) }
func (c stopClock) syncEnd() time.Time  { return c.at(7) }
func (c stopClock) end() time.Time      { return c.at(8) }

// waitUntil waits for done to be closed, or for the deadline; it reports
// whether done was closed.
func waitUntil(done <-chan struct{}, deadline time.Time) bool {
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case <-done:
		return true
	case <-t.C:
		return false
	}
}

// stopServer lets in-flight calls finish until the clock's grace end, then
// cancels them and waits for their handlers until its drain end.
func (d *Driver) stopServer(srv *grpc.Server, c stopClock) {
	done := make(chan struct{})
	go func() {
		srv.GracefulStop()
		close(done)
	}()
	if !waitUntil(done, c.graceEnd()) {
		klog.InfoS("Graceful stop timed out; cancelling in-flight calls", "after", time.Since(c.start).Round(time.Millisecond))
		srv.Stop()
	}
	if !waitUntil(done, c.drainEnd()) || !waitUntil(d.calls.idle(), c.drainEnd()) {
		klog.InfoS("Calls still running after their cancellation; stopping without them", "calls", d.calls.count())
	}
}

// shutdown makes everything acknowledged so far durable and releases the
// store, within the clock's end. The kernel objects (mounts, loop devices)
// stay: their users keep their mounts, and the next instance rebuilds the
// I/O path under them.
func (d *Driver) shutdown(c stopClock) error {
	ctx, cancel := context.WithDeadline(context.Background(), c.syncEnd())
	syncErr := d.node.syncAll(ctx)
	cancel()

	released := make(chan error, 1)
	go func() { released <- d.release() }()
	t := time.NewTimer(time.Until(c.end()))
	defer t.Stop()
	var relErr error
	select {
	case relErr = <-released:
	case <-t.C:
		relErr = fmt.Errorf("closing the store and unmounting did not finish within --stop-timeout %v; exiting without waiting", d.opts.StopTimeout)
	}
	err := errors.Join(syncErr, relErr)
	if err != nil {
		klog.ErrorS(err, "Stopping", "took", time.Since(c.start).Round(time.Millisecond))
	} else {
		klog.InfoS("Stopped", "took", time.Since(c.start).Round(time.Millisecond))
	}
	return err
}

// release saves the node state, closes the store and unmounts the FUSE
// filesystem.
func (d *Driver) release() error {
	var errs []error
	errs = append(errs, d.node.saveState())
	if d.engine != nil {
		if err := d.engine.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close store: %w", err))
		}
	}
	errs = append(errs, d.node.unmountExport())
	return errors.Join(errs...)
}

// syncWorkers bounds how many volumes are synced at once on shutdown: each
// sync is I/O through the driver's own FUSE server, which a few parallel
// syncs keep busy.
const syncWorkers = 8

// syncJob is one staged volume to sync on shutdown.
type syncJob struct {
	id  string
	sv  stagedVolume
	vol OpenVolume
}

// syncAll makes everything acknowledged durable, in parallel: it syncs
// staged filesystems, flushes their loop devices down to the engine and
// flushes the engine volumes. It returns when all are done or ctx ends;
// the volumes not done by then are named in the error, and their syncs are
// left running (see stopClock).
func (n *nodeService) syncAll(ctx context.Context) error {
	n.mu.Lock()
	jobs := make(chan syncJob, len(n.vols))
	var ids []string
	for id, sv := range n.vols {
		if n.open[id] == nil && sv.LoopDevice == "" {
			continue // left unrecovered by a stop during start: nothing attached
		}
		jobs <- syncJob{id: id, sv: *sv, vol: n.open[id]}
		ids = append(ids, id)
	}
	n.mu.Unlock()
	close(jobs)

	var mu sync.Mutex
	finished := map[string]bool{}
	var errs []error
	var wg sync.WaitGroup
	for range min(len(ids), syncWorkers) {
		wg.Go(func() {
			for j := range jobs {
				if ctx.Err() != nil {
					return // out of time: the rest stays unsynced
				}
				err := n.syncVolume(ctx, j)
				mu.Lock()
				finished[j.id] = true
				if err != nil {
					errs = append(errs, fmt.Errorf("volume %s: %w", j.id, err))
				}
				mu.Unlock()
			}
		})
	}
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
	}
	mu.Lock()
	defer mu.Unlock()
	var late []string
	for _, id := range ids {
		if !finished[id] {
			late = append(late, id)
		}
	}
	if len(late) > 0 {
		sort.Strings(late)
		errs = append(errs, fmt.Errorf("%d of %d volumes not synced within the stop timeout (only their unacknowledged writes may be lost): %s",
			len(late), len(ids), strings.Join(late, ", ")))
	}
	return errors.Join(errs...)
}

// syncVolume syncs one staged volume: filesystem, loop device, engine.
func (n *nodeService) syncVolume(ctx context.Context, j syncJob) error {
	if j.sv.AccessType == accessMount {
		// In a child, like every call that waits on this process's
		// own FUSE connection (package fsop).
		if err := fsop.SyncFS(ctx, j.sv.StagingPath); err != nil {
			return err
		}
	}
	if j.sv.LoopDevice != "" {
		if err := n.loop().Sync(ctx, j.sv.LoopDevice); err != nil {
			return err
		}
	}
	if j.vol != nil {
		if err := j.vol.Flush(); err != nil {
			return fmt.Errorf("flush: %w", err)
		}
	}
	return nil
}

// saveState writes the node state one last time. A state this instance
// did not load (its start failed before) must not overwrite the one on
// disk: that would forget every volume staged there, for the next
// instance too.
func (n *nodeService) saveState() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.loaded {
		return nil
	}
	if err := n.state.save(n.vols); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

func (n *nodeService) unmountExport() error {
	if n.export == nil {
		return nil
	}
	return n.export.Unmount()
}

// callTracker counts the gRPC handlers running, so that the stop sequence
// can wait for cancelled calls to return.
type callTracker struct {
	mu      sync.Mutex
	n       int
	idleNow chan struct{} // closed while n == 0
}

func newCallTracker() *callTracker {
	c := &callTracker{idleNow: make(chan struct{})}
	close(c.idleNow)
	return c
}

func (c *callTracker) intercept(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	c.mu.Lock()
	if c.n == 0 {
		c.idleNow = make(chan struct{})
	}
	c.n++
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.n--
		if c.n == 0 {
			close(c.idleNow)
		}
		c.mu.Unlock()
	}()
	return handler(ctx, req)
}

// idle returns a channel closed once no handler runs (now, or later).
func (c *callTracker) idle() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.idleNow
}

func (c *callTracker) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}
