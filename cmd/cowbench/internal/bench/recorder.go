package bench

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"
)

// Key names a cell of the results: one operation at one volume size and
// concurrency level.
type Key struct {
	Op          string
	Size        int64
	Concurrency int
}

func (k Key) String() string {
	return fmt.Sprintf("%s c=%d %s", SizeLabel(k.Size), k.Concurrency, k.Op)
}

// Task is one timed operation. It returns when the operation is complete
// (for example a snapshot ready to use), so its duration is the latency.
type Task func(ctx context.Context) error

// Phase describes a batch of tasks of one operation run together.
type Phase struct {
	Key
	// Planned is how many tasks the phase has when nothing failed before
	// it; the progress display counts the difference as skipped.
	Planned int
	// Bytes each task writes, for the throughput of the write operation.
	Bytes int64
}

// Recorder runs phases and keeps their samples.
type Recorder struct {
	// OpTimeout bounds each task (0: no bound besides ctx).
	OpTimeout time.Duration
	Progress  *Progress

	mu       sync.Mutex
	cells    map[Key]*cell
	failures map[Failure]int
	order    []Failure
}

// NewRecorder returns a recorder reporting to p (nil: no progress display).
func NewRecorder(opTimeout time.Duration, p *Progress) *Recorder {
	return &Recorder{OpTimeout: opTimeout, Progress: p, cells: map[Key]*cell{}, failures: map[Failure]int{}}
}

// cell accumulates the phases of one key (the snapshot rounds of a size and
// concurrency level are phases of one key).
type cell struct {
	samples []time.Duration
	errors  int
	wall    time.Duration
	bytes   int64
}

// Run runs tasks with at most ph.Concurrency in flight and records how long
// each took. It returns each task's error. Tasks that ctx ended (Ctrl-C,
// --timeout) before or while they ran are not counted as failures of the
// operation: their errors are ctx's.
func (r *Recorder) Run(ctx context.Context, ph Phase, tasks []Task) []error {
	errs := make([]error, len(tasks))
	r.Progress.Begin(ph.Key.String(), ph.Planned-len(tasks))
	var (
		mu      sync.Mutex
		samples []time.Duration
		failed  int
		first   time.Time
		last    time.Time
	)
	next := make(chan int)
	var wg sync.WaitGroup
	for range max(1, min(ph.Concurrency, len(tasks))) {
		wg.Go(func() {
			for i := range next {
				tctx, cancel := ctx, context.CancelFunc(func() {})
				if r.OpTimeout > 0 {
					tctx, cancel = context.WithTimeout(ctx, r.OpTimeout)
				}
				start := time.Now()
				err := tasks[i](tctx)
				end := time.Now()
				cancel()
				if err != nil && r.OpTimeout > 0 && ctx.Err() == nil && errors.Is(tctx.Err(), context.DeadlineExceeded) {
					err = fmt.Errorf("not done within --op-timeout %v: %w", r.OpTimeout, err)
				}
				errs[i] = err
				mu.Lock()
				if first.IsZero() || start.Before(first) {
					first = start
				}
				if end.After(last) {
					last = end
				}
				switch {
				case err == nil:
					samples = append(samples, end.Sub(start))
				case ctx.Err() != nil:
					// interrupted: neither a sample nor a failure
				default:
					failed++
					r.fail(ph.Key, err)
				}
				mu.Unlock()
				r.Progress.Step(err != nil && ctx.Err() == nil)
			}
		})
	}
	for i := range tasks {
		if ctx.Err() != nil {
			errs[i] = ctx.Err()
			continue
		}
		next <- i
	}
	close(next)
	wg.Wait()
	if len(samples)+failed == 0 {
		r.Progress.End("")
		return errs
	}
	r.mu.Lock()
	c := r.cells[ph.Key]
	if c == nil {
		c = &cell{}
		r.cells[ph.Key] = c
	}
	c.samples = append(c.samples, samples...)
	c.errors += failed
	c.wall += last.Sub(first)
	c.bytes += ph.Bytes * int64(len(samples))
	r.mu.Unlock()
	r.Progress.End(phaseSummary(newRow(ph.Key, samples, failed, last.Sub(first), ph.Bytes*int64(len(samples)))))
	return errs
}

func phaseSummary(row Row) string {
	s := fmt.Sprintf("%-6s c=%-3d %-15s %4d ok", row.Size, row.Concurrency, row.Op, row.Count)
	if row.Errors > 0 {
		s += fmt.Sprintf(", %d FAILED", row.Errors)
	}
	if row.Count > 0 {
		s += fmt.Sprintf("  p50 %s  max %s", FormatMs(row.P50Ms), FormatMs(row.MaxMs))
	}
	if row.BytesPerSecond > 0 {
		s += "  " + FormatRate(row.BytesPerSecond)
	}
	return s
}

func (r *Recorder) fail(k Key, err error) {
	f := Failure{Op: k.Op, Size: SizeLabel(k.Size), Concurrency: k.Concurrency, Message: err.Error()}
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.failures[f]; !ok {
		r.order = append(r.order, f)
	}
	r.failures[f]++
}

// Rows returns the rows recorded so far in the order of Ops, then size,
// then concurrency.
func (r *Recorder) Rows() []Row {
	r.mu.Lock()
	defer r.mu.Unlock()
	rank := map[string]int{}
	for i, op := range Ops {
		rank[op] = i
	}
	var rows []Row
	for k, c := range r.cells {
		rows = append(rows, newRow(k, c.samples, c.errors, c.wall, c.bytes))
	}
	sort.SliceStable(rows, func(i, j int) bool {
		a, b := rows[i], rows[j]
		if a.Op != b.Op {
			return rank[a.Op] < rank[b.Op]
		}
		if a.SizeBytes != b.SizeBytes {
			return a.SizeBytes < b.SizeBytes
		}
		return a.Concurrency < b.Concurrency
	})
	return rows
}

// Failures returns each distinct failure with its count, in order of first
// occurrence.
func (r *Recorder) Failures() []Failure {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]Failure, 0, len(r.order))
	for _, f := range r.order {
		f.Count = r.failures[f]
		out = append(out, f)
	}
	return out
}

// FormatMs writes a latency in milliseconds with three significant digits
// and a unit that suits it: 512µs, 12.3ms, 1.23s.
func FormatMs(v float64) string {
	switch {
	case v <= 0:
		return "0"
	case v < 1:
		return fmt.Sprintf("%.0fµs", v*1000)
	case v < 10:
		return fmt.Sprintf("%.2fms", v)
	case v < 100:
		return fmt.Sprintf("%.1fms", v)
	case v < 1000:
		return fmt.Sprintf("%.0fms", v)
	case v < 10000:
		return fmt.Sprintf("%.2fs", v/1000)
	case v < 100000:
		return fmt.Sprintf("%.1fs", v/1000)
	}
	return fmt.Sprintf("%.0fs", v/1000)
}

// FormatRate writes a byte rate in MiB/s.
func FormatRate(bytesPerSecond float64) string {
	return fmt.Sprintf("%.0f MiB/s", bytesPerSecond/(1<<20))
}

// Each runs fn on every item as one phase of rec and returns the items it
// succeeded on, in order.
func Each[T any](ctx context.Context, rec *Recorder, ph Phase, items []T, fn func(context.Context, T) error) []T {
	tasks := make([]Task, len(items))
	for i, it := range items {
		tasks[i] = func(ctx context.Context) error { return fn(ctx, it) }
	}
	errs := rec.Run(ctx, ph, tasks)
	var ok []T
	for i, it := range items {
		if errs[i] == nil {
			ok = append(ok, it)
		}
	}
	return ok
}

// Rounds runs rounds phases ph one after the other: round k runs fn on
// mk(src, k) for every src. It returns the items fn succeeded on, round
// after round.
func Rounds[S, T any](ctx context.Context, rec *Recorder, ph Phase, rounds int, srcs []S, mk func(src S, round int) T, fn func(context.Context, T) error) []T {
	var ok []T
	for k := range rounds {
		round := make([]T, len(srcs))
		for i, src := range srcs {
			round[i] = mk(src, k)
		}
		ok = append(ok, Each(ctx, rec, ph, round, fn)...)
	}
	return ok
}
