package driver

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/cowcsi/cowcsi/driver/internal/fsop"
)

// errFreezePending: a freeze this driver started on the volume has not
// ended yet (a late FIFREEZE that its child still has to thaw). A new
// freeze would read EBUSY as "frozen by someone else".
var errFreezePending = errors.New("a previous freeze of the volume is still pending")

// errStagingNotMounted: the staging path is not on the volume's loop
// device, so the snapshot cannot be made consistent, and the filesystem
// that is there (the node's own) must not be frozen.
var errStagingNotMounted = errors.New("staging mount missing")

// quiesced is a volume whose content in the engine is complete up to now.
type quiesced struct {
	// deadline, if set, is when the frozen window ends: whatever must
	// happen while frozen (the engine's cut) must be done by then.
	deadline time.Time
	release  func() error
}

// Release thaws, if the volume was frozen. It fails wrapping
// fsop.ErrExpired when the frozen window ended before: the cut made in
// between may have seen the filesystem unfrozen. Idempotent.
func (q *quiesced) Release() error { return q.release() }

// bound returns ctx limited by the frozen window.
func (q *quiesced) bound(ctx context.Context) (context.Context, context.CancelFunc) {
	if q.deadline.IsZero() {
		return context.WithCancel(ctx)
	}
	return context.WithDeadline(ctx, q.deadline)
}

var notQuiesced = &quiesced{release: func() error { return nil }}

// quiesce makes a volume's content in the engine complete up to now, if it
// is staged here: it freezes the staging filesystem (unless freeze is
// false, the volume is a block volume or read-only) and flushes the loop
// device down to the engine, both in a child process (package fsop). Not
// staged here: nothing is cached in the kernel, the engine already has
// everything.
func (n *nodeService) quiesce(ctx context.Context, id string, freeze bool) (*quiesced, error) {
	sv := n.get(id)
	if sv == nil {
		return notQuiesced, nil
	}
	if !freeze || sv.AccessType != accessMount || sv.ReadOnly {
		if err := n.loop().Sync(ctx, sv.LoopDevice); err != nil {
			return nil, fmt.Errorf("flush loop device %s: %w", sv.LoopDevice, err)
		}
		return notQuiesced, nil
	}
	return n.freeze(ctx, sv)
}

// freeze freezes sv's staging filesystem in a child process and flushes its
// loop device there. The whole frozen window (the freeze, the flush and
// what the caller does before Release) is bounded by FreezeTimeout: the
// child thaws by itself when it ends. Before the child starts, the freeze
// is recorded in the node state, so a crash that takes the child along is
// thawed at the next start; the record goes when the child has exited
// having thawed.
func (n *nodeService) freeze(ctx context.Context, sv *stagedVolume) (*quiesced, error) {
	window := n.d.opts.FreezeTimeout
	actx, cancel := context.WithTimeout(ctx, window)
	defer cancel()
	done, err := n.freezes.acquire(actx, sv.VolumeID)
	if err != nil {
		return nil, err
	}
	rec, err := n.recordFreeze(sv)
	if err != nil {
		done()
		return nil, err
	}
	// The window starts here. The child counts it from its own start, a
	// little later, so the engine's cut, bounded by this deadline, ends
	// before the child's own thaw.
	start := time.Now()
	wctx, cancel := context.WithDeadline(ctx, start.Add(window))
	defer cancel()
	f, err := fsop.StartFreeze(wctx, sv.StagingPath, sv.LoopDevice, window)
	if f == nil {
		n.forgetFreeze(rec)
		done()
		return nil, err
	}
	go n.reapFreeze(f, rec, done)
	switch {
	case errors.Is(err, fsop.ErrNotMounted):
		return nil, fmt.Errorf("%w: %s is not mounted on %s, nothing frozen: %v", errStagingNotMounted, sv.StagingPath, sv.LoopDevice, err)
	case err != nil:
		return nil, err
	case f.State == fsop.StateBusy:
		// Frozen by someone else (a backup tool, fsfreeze), not by this
		// driver (acquire waited for our own): the filesystem is
		// quiesced on its device, which is all a snapshot needs; the
		// thaw is theirs.
		klog.InfoS("Filesystem already frozen; snapshotting it as is", "volume", sv.VolumeID, "path", sv.StagingPath)
	case f.State == fsop.StateSynced:
		klog.V(2).InfoS("Filesystem cannot freeze; synced instead", "volume", sv.VolumeID, "path", sv.StagingPath)
	}
	release := func() error {
		tctx, cancel := context.WithTimeout(context.Background(), window)
		defer cancel()
		return f.Thaw(tctx)
	}
	return &quiesced{deadline: start.Add(window), release: release}, nil
}

// reapFreeze waits for a freeze child to exit. One that did not exit
// cleanly (killed, or its thaw failed) may have left the filesystem
// frozen: it is thawed again from its record, which is kept if that fails
// (the next start tries again). Only then may the volume be frozen again.
func (n *nodeService) reapFreeze(f *fsop.Freeze, rec freezeRecord, done func()) {
	defer done()
	<-f.Exited()
	if !f.Clean() {
		klog.ErrorS(nil, "Freeze child ended without thawing; thawing from its record", "volume", rec.VolumeID, "pid", f.Pid())
		if err := n.thawRecord(context.Background(), rec); err != nil {
			return
		}
	}
	n.forgetFreeze(rec)
}

// recordFreeze writes the record of a freeze of sv, durably.
func (n *nodeService) recordFreeze(sv *stagedVolume) (freezeRecord, error) {
	var st unix.Stat_t
	if err := unix.Stat(sv.LoopDevice, &st); err != nil {
		return freezeRecord{}, fmt.Errorf("stat loop device: %w", err)
	}
	rec := freezeRecord{VolumeID: sv.VolumeID, Dev: st.Rdev, Paths: []string{sv.StagingPath}}
	for t := range sv.Targets {
		rec.Paths = append(rec.Paths, t)
	}
	slices.Sort(rec.Paths[1:])
	if err := n.state.putFreeze(rec); err != nil {
		return freezeRecord{}, fmt.Errorf("record freeze of %s: %w", sv.VolumeID, err)
	}
	return rec, nil
}

func (n *nodeService) forgetFreeze(rec freezeRecord) {
	if err := n.state.clearFreeze(rec.VolumeID); err != nil {
		klog.ErrorS(err, "Removing a freeze record", "volume", rec.VolumeID)
	}
}

// thawRecord thaws a recorded freeze in a child process, bounded by the
// freeze timeout.
func (n *nodeService) thawRecord(ctx context.Context, rec freezeRecord) error {
	ctx, cancel := context.WithTimeout(ctx, n.d.opts.FreezeTimeout)
	defer cancel()
	what, err := fsop.Thaw(ctx, rec.Paths, rec.Dev)
	if err != nil {
		klog.ErrorS(err, "Cannot thaw a filesystem this driver froze", "volume", rec.VolumeID, "paths", rec.Paths)
		return err
	}
	klog.InfoS("Thawed a recorded freeze", "volume", rec.VolumeID, "result", what)
	return nil
}

// thawRecorded thaws every freeze recorded by a previous instance: a crash
// takes the freeze child along, and neither unmounting nor detaching thaws
// a frozen filesystem. It runs first thing at start.
func (n *nodeService) thawRecorded(ctx context.Context) {
	recs, err := n.state.loadFreezes()
	if err != nil {
		klog.ErrorS(err, "Reading freeze records")
	}
	for _, rec := range recs {
		if err := n.thawRecord(ctx, rec); err == nil {
			n.forgetFreeze(rec)
		}
	}
}

// freezeTracker holds, per volume, the freeze this driver has under way:
// from before its child starts until the child has exited (and so thawed).
type freezeTracker struct {
	mu      sync.Mutex
	pending map[string]chan struct{}
}

// acquire waits until no freeze of volume id is under way and takes the
// slot; done gives it back. It fails wrapping errFreezePending if ctx ends
// first.
func (t *freezeTracker) acquire(ctx context.Context, id string) (done func(), err error) {
	for {
		t.mu.Lock()
		if t.pending == nil {
			t.pending = map[string]chan struct{}{}
		}
		ch, busy := t.pending[id]
		if !busy {
			ch = make(chan struct{})
			t.pending[id] = ch
			t.mu.Unlock()
			return func() {
				t.mu.Lock()
				delete(t.pending, id)
				t.mu.Unlock()
				close(ch)
			}, nil
		}
		t.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, fmt.Errorf("volume %s: %w (%v)", id, errFreezePending, ctx.Err())
		}
	}
}

// pendingFreezes is how many freezes are under way (tests).
func (t *freezeTracker) pendingFreezes() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.pending)
}
