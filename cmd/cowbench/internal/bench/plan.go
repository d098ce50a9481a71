package bench

import (
	"errors"
	"fmt"
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
	Snapshots int // snapshots of each source volume
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
	return errs
}
