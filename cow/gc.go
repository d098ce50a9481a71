package cow

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"

	"k8s.io/klog/v2"

	"github.com/cowcsi/cowcsi/cow/internal/ondisk"
)

// Layers no volume or snapshot references any more are removed (no child) or
// merged into their single child, so the chain below a volume only holds
// layers that live snapshots or other volumes need. The work runs in one
// background goroutine; each step is crash-safe:
//
//  1. copy the blocks the parent owns and the child does not into the child's
//     data file, fdatasync it;
//  2. append those ranges to the child's journal, fdatasync it;
//  3. one catalog commit re-parents the child and drops the parent;
//  4. remove the parent's files.
//
// A crash after 2 leaves a child that owns copies of blocks its view showed
// anyway; the merge runs again after reopen and finds nothing left to copy.
// Orphan files after 3 are removed when the store opens.

func (s *Store) kickGC() {
	select {
	case s.gcKick <- struct{}{}:
	default:
	}
}

// Retries of a failed pass: the wait doubles from gcRetryMin up to
// gcRetryMax while passes keep failing, and starts over after a pass that
// completes. A kick (a delete) runs a pass at once whatever the wait.
const (
	gcRetryMin = 100 * time.Millisecond
	gcRetryMax = 30 * time.Second
)

func (s *Store) gcLoop() {
	defer close(s.gcDone)
	// Close must not wait for a long merge: stopping one midway is safe
	// (nothing is journaled until its copy is complete; blocks copied into
	// the child's file that it does not own are never read and are copied
	// again by the next merge).
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		<-s.gcStop
		cancel()
	}()
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	defer retry.Stop()
	var wait time.Duration
	for {
		select {
		case <-s.gcStop:
			return
		case <-s.gcKick:
		case <-retry.C:
		}
		if s.opts.NoBackgroundMerge {
			continue
		}
		err := s.runGC(ctx)
		if err == nil || ctx.Err() != nil {
			wait = 0
			continue
		}
		wait = min(max(2*wait, gcRetryMin), gcRetryMax)
		klog.ErrorS(err, "Removing or merging unreferenced layers failed, retrying", "store", s.dir, "retryIn", wait)
		retry.Stop()
		retry.Reset(wait)
	}
}

// WaitIdle runs pending merges and removals to completion.
func (s *Store) WaitIdle(ctx context.Context) error {
	if err := s.checkOpen(); err != nil {
		return err
	}
	return s.runGC(ctx)
}

type gcJob struct {
	layer *layer
	child *layer // nil: remove
	vol   *volume
}

// runGC removes and merges unreferenced layers until none is left but
// those whose job failed in this pass. Removals come first: they free
// space, while a merge may need space to copy into its child, so on a full
// store a failing merge must not keep a removal from running. A failed job
// is skipped for the rest of the pass and the others go on; the pass
// returns every error it met (the caller retries).
func (s *Store) runGC(ctx context.Context) error {
	s.gcMu.Lock()
	defer s.gcMu.Unlock()
	failed := map[uint32]bool{}
	var errs []error
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		s.topo.Lock()
		if s.closed.Load() {
			s.topo.Unlock()
			return nil
		}
		job, ok := s.nextGCJob(failed)
		if !ok {
			s.topo.Unlock()
			break
		}
		if job.child == nil {
			err := s.removeLayer(job.layer)
			s.topo.Unlock()
			if err != nil {
				failed[job.layer.num] = true
				errs = append(errs, fmt.Errorf("removing layer %d: %w", job.layer.num, err))
			}
			continue
		}
		s.topo.Unlock()
		if err := s.merge(ctx, job); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			failed[job.layer.num] = true
			errs = append(errs, fmt.Errorf("merging layer %d into %d: %w", job.layer.num, job.child.num, err))
		}
	}
	s.topo.Lock()
	s.relabelAliases()
	s.dropIdleStale()
	s.topo.Unlock()
	if err := s.settleRetired(); err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		s.gcFailures.Add(1)
	}
	return errors.Join(errs...)
}

// nextGCJob finds an unreferenced layer not in skip: one to remove if there
// is any, else one to merge. Caller holds topo.
func (s *Store) nextGCJob(skip map[uint32]bool) (gcJob, bool) {
	referenced := map[uint32]bool{}
	heads := map[uint32]*volume{}
	for _, v := range s.vols {
		n := v.head.Load().num
		referenced[n] = true
		heads[n] = v
	}
	for _, sn := range s.cat.snaps {
		referenced[sn.Layer] = true
	}
	children := map[uint32][]*layer{}
	for _, l := range s.byNum {
		if l.parent != nil {
			children[l.parent.num] = append(children[l.parent.num], l)
		}
	}
	nums := make([]uint32, 0, len(s.byNum))
	for n := range s.byNum {
		if !referenced[n] && !skip[n] {
			nums = append(nums, n)
		}
	}
	// Removals first (see runGC): removing a deleted volume's head leaves
	// its parent childless, so it is removed next instead of merged. The
	// order among them only makes passes repeatable.
	sort.Slice(nums, func(i, j int) bool { return nums[i] > nums[j] })
	for _, n := range nums {
		if len(children[n]) == 0 {
			return gcJob{layer: s.byNum[n]}, true
		}
	}
	for _, n := range nums {
		if kids := children[n]; len(kids) == 1 {
			return gcJob{layer: s.byNum[n], child: kids[0], vol: heads[kids[0].num]}, true
		}
	}
	return gcJob{}, false
}

// removeLayer drops a layer nothing references and nothing sits on. Caller
// holds topo.
func (s *Store) removeLayer(l *layer) error {
	if err := s.cat.commit([]ondisk.Op{{Kind: ondisk.OpDelLayer, Num: l.num}}); err != nil {
		return err
	}
	delete(s.byNum, l.num)
	// Drop the slot and the aliases of layers merged into this one: no tree
	// that can still be read names them (nothing reads a layer without a
	// volume or a snapshot).
	nums := append(append([]uint32{l.num}, l.aliases...), l.stale...)
	for _, n := range nums {
		s.slots.set(n, nil)
	}
	s.retire(nums...)
	l.close()
	l.treeMu.Lock()
	l.tree = tree{}
	l.treeMu.Unlock()
	return removeLayerFiles(s.opts.Faults, s.layerFS, l.num)
}

// mergeBatch is how many blocks one copy step holds the stripe locks for.
const mergeBatch = 256

func (s *Store) merge(ctx context.Context, job gcJob) error {
	f, c := job.layer, job.child
	ranges, err := f.readRanges()
	if err != nil {
		return err
	}
	var copied []ondisk.Range
	if len(ranges) > 0 {
		if err := c.ensureFiles(s.layerFS); err != nil {
			return err
		}
	}
	buf := make([]byte, mergeBatch*BlockSize)
	for _, r := range coalesce(ranges) {
		for start := r.Start; start < r.End(); start += mergeBatch {
			if err := ctx.Err(); err != nil {
				c.unreserve(copied) // the child's copies, never owned
				return err
			}
			end := min(start+mergeBatch, r.End())
			got, err := s.mergeStep(job, start, end, buf)
			if err != nil {
				c.unreserve(copied)
				return err
			}
			copied = append(copied, got...)
		}
	}
	return s.mergeCommit(job, copied)
}

// mergeCommit ends the merge of f into its child c, which holds copies
// of the blocks in copied at new places: c adopts those it still has no
// place for (the others it came to own since their copy, and their copies
// are freed), its records become durable with its own writes' (one flush:
// the data, then the journal in the order of the changes in memory), and
// one catalog commit drops f. Under topo: a head child may not be frozen
// by a snapshot while it adopts (the frozen layer's index is shared).
func (s *Store) mergeCommit(job gcJob, copied []ondisk.Range) error {
	f, c := job.layer, job.child
	s.topo.Lock()
	defer s.topo.Unlock()
	c.adopt(copied)
	// Blocks skipped because the child owns them may be owned only in
	// memory (written, not flushed): the flush makes that durable before
	// the parent can disappear, or a crash would leave them reading from
	// below with nothing there.
	if err := c.flush(s.layerFS); err != nil {
		return err
	}
	if err := s.commitMerge(f, c); err != nil {
		return err
	}
	return s.dropMerged(f)
}

// adopt makes a layer own the copies in recs (merge) of blocks it has
// no place for yet, and frees the copies of the others.
func (l *layer) adopt(recs []ondisk.Range) {
	l.treeMu.Lock()
	var extra []ondisk.Range
	before := l.locs.blocks
	for _, r := range recs {
		for b := r.Start; b < r.End(); {
			_, n, ok := l.locs.get(b)
			n = min(n, r.End()-b)
			part := ondisk.Range{Start: b, Count: n, Loc: r.Loc}
			if r.Loc != ondisk.LocZero {
				part.Loc += b - r.Start
			}
			if ok {
				extra = append(extra, part)
			} else {
				l.locs.set(part.Start, part.Count, part.Loc)
				if !l.frozen {
					// Still a head: its writes take the fast path on
					// these blocks.
					l.tree.setRange(part.Start, part.End(), l.num)
				}
				l.pending = append(l.pending, part)
			}
			b += n
		}
	}
	l.owned.Add(int64(l.locs.blocks - before))
	l.treeMu.Unlock()
	l.unreserve(extra)
}

// commitMerge re-parents c onto f's parent and drops f in one catalog
// commit, then points f's tree entries at c. Caller holds topo.
func (s *Store) commitMerge(f, c *layer) error {
	crec := layerRec(c)
	crec.Parent = 0
	if f.parent != nil {
		crec.Parent = f.parent.num
	}
	if err := s.cat.commit([]ondisk.Op{{Kind: ondisk.OpPutLayer, Layer: crec}, {Kind: ondisk.OpDelLayer, Num: f.num}}); err != nil {
		return err
	}
	c.parent = f.parent
	if c.frozen {
		// Its index, shared with the layers above, still names f's
		// blocks by f's number and its aliases'.
		c.aliases = append(append(append(c.aliases, f.num), f.aliases...), f.stale...)
	} else {
		// adopt retagged every block f held: only reads in flight can
		// still name f.
		c.stale = append(append(append(c.stale, f.num), f.aliases...), f.stale...)
	}
	f.mergedInto.Store(c)
	delete(s.byNum, f.num)
	return nil
}

// dropMerged closes a merged layer and removes its files.
func (s *Store) dropMerged(f *layer) error {
	f.close()
	f.treeMu.Lock()
	f.tree = tree{}
	f.treeMu.Unlock()
	return removeLayerFiles(s.opts.Faults, s.layerFS, f.num)
}

// mergeStep copies blocks [start, end) that f owns and c does not into c.
func (s *Store) mergeStep(job gcJob, start, end uint64, buf []byte) ([]ondisk.Range, error) {
	f, c := job.layer, job.child
	if job.vol != nil {
		unlock := job.vol.lockStripes(start, end-1)
		defer unlock()
	}
	var out []ondisk.Range
	c.treeMu.RLock()
	need := make([]bool, end-start)
	for b := start; b < end; b++ {
		if o := s.resolve(c.tree.get(b)); o != c {
			need[b-start] = true
		}
	}
	c.treeMu.RUnlock()
	for b := start; b < end; {
		if !need[b-start] {
			b++
			continue
		}
		e := b
		for e < end && need[e-start] {
			e++
		}
		p := buf[:(e-b)*BlockSize]
		if err := s.readOwner(f.num, p, int64(b)<<blockShift, false); err != nil {
			c.unreserve(out)
			return nil, err
		}
		recs, err := c.appendCopy(p, b)
		if err != nil {
			c.unreserve(out)
			return nil, err
		}
		out = append(out, recs...)
		b = e
	}
	return out, nil
}

// appendCopy appends blocks p, from block b on, to a layer's data
// file, and returns their records: places for blocks with data, LocZero
// for blocks all zero (merged discards take no space). Nothing is owned
// yet (adopt).
func (l *layer) appendCopy(p []byte, b uint64) ([]ondisk.Range, error) {
	var recs []ondisk.Range
	var data uint64
	for i := 0; i < len(p); i += BlockSize {
		zero := allZeroBytes(p[i : i+BlockSize])
		bl := b + uint64(i/BlockSize)
		if k := len(recs); k > 0 && (recs[k-1].Loc == ondisk.LocZero) == zero {
			recs[k-1].Count++
		} else {
			r := ondisk.Range{Start: bl, Count: 1, Loc: ondisk.LocZero}
			if !zero {
				r.Loc = 0 // placed below
			}
			recs = append(recs, r)
		}
		if !zero {
			data++
		}
	}
	loc, err := l.alloc(data)
	if err != nil {
		return nil, err
	}
	for k := range recs {
		r := &recs[k]
		if r.Loc == ondisk.LocZero {
			continue
		}
		r.Loc = loc
		loc += r.Count
		from := (r.Start - b) * BlockSize
		if err := l.writeData(p[from:from+r.Count*BlockSize], int64(r.Loc)<<blockShift); err != nil {
			l.unreserve(recs[:k+1])
			return nil, err
		}
	}
	return recs, nil
}
