package bench

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Access types of the volumes: a raw block device, or a filesystem.
const (
	AccessBlock = "block"
	AccessMount = "mount"
)

// Plan is what both modes measure: every size at every concurrency level
// (a cell), with Volumes source volumes per cell and Snapshots snapshots of
// each.
type Plan struct {
	Sizes       []int64 // volume sizes in bytes
	Concurrency []int   // operations in flight, one pass per level
	// Volumes is the number of source volumes per size and concurrency
	// level (0: twice the concurrency level, at least 4).
	Volumes   int
	Snapshots int    // snapshots of each source volume
	Access    string // AccessBlock or AccessMount
	Clone     bool   // also measure clones (a volume from a volume)
}

// VolumesFor returns the number of source volumes at a concurrency level.
func (p *Plan) VolumesFor(conc int) int {
	if p.Volumes > 0 {
		return p.Volumes
	}
	return max(4, 2*conc)
}

// Validate returns what is wrong with the plan, in the words of the flags
// that set it.
func (p *Plan) Validate() []error {
	var errs []error
	if len(p.Sizes) == 0 {
		errs = append(errs, errors.New("--sizes: at least one size"))
	}
	for _, s := range p.Sizes {
		if s <= 0 {
			errs = append(errs, fmt.Errorf("--sizes: %d is not a positive size", s))
		}
	}
	if len(p.Concurrency) == 0 {
		errs = append(errs, errors.New("--concurrency: at least one level"))
	}
	for _, n := range p.Concurrency {
		if n < 1 {
			errs = append(errs, fmt.Errorf("--concurrency: %d is below 1", n))
		}
	}
	if p.Volumes < 0 {
		errs = append(errs, errors.New("--volumes must not be negative"))
	}
	if p.Snapshots < 1 {
		errs = append(errs, errors.New("--snapshots must be at least 1"))
	}
	switch p.Access {
	case AccessBlock, AccessMount:
	default:
		errs = append(errs, fmt.Errorf("--access %q: want block or mount", p.Access))
	}
	return errs
}

// Total sums perCell over the cells of the plan: the operations of the
// whole run, for the progress bar.
func (p *Plan) Total(perCell func(conc int) int) int {
	total := 0
	for range p.Sizes {
		for _, c := range p.Concurrency {
			total += perCell(c)
		}
	}
	return total
}

// Measure runs cell for every size at every concurrency level, in that
// order, until ctx ends, then finishes prog.
func (p *Plan) Measure(ctx context.Context, prog *Progress, cell func(ctx context.Context, size int64, conc int)) {
	for _, size := range p.Sizes {
		for _, conc := range p.Concurrency {
			if ctx.Err() != nil {
				break
			}
			cell(ctx, size, conc)
		}
	}
	prog.Finish()
}

// Settings describes the plan for the result: sizes, concurrency levels,
// volumes and snapshots. The modes add their own.
func (p *Plan) Settings() []Setting {
	var sizes, concs, vols []string
	for _, s := range p.Sizes {
		sizes = append(sizes, SizeLabel(s))
	}
	for _, c := range p.Concurrency {
		concs = append(concs, fmt.Sprint(c))
		vols = append(vols, fmt.Sprintf("%d at concurrency %d", p.VolumesFor(c), c))
	}
	return []Setting{
		{Name: "sizes", Value: strings.Join(sizes, ", ")},
		{Name: "concurrency", Value: strings.Join(concs, ", ")},
		{Name: "volumes", Value: "per size: " + strings.Join(vols, ", ")},
		{Name: "snapshots", Value: fmt.Sprintf("%d per source volume, each restored once", p.Snapshots)},
	}
}

// CleanUp runs cleanup with a context of its own, timeout long: the run's
// context may have ended, and what was created must still go. Its error is
// joined to *err. Runs defer it.
func CleanUp(err *error, timeout time.Duration, cleanup func(context.Context) error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if cerr := cleanup(ctx); cerr != nil {
		*err = errors.Join(*err, fmt.Errorf("cleanup: %w", cerr))
	}
}
