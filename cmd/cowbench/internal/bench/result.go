// Package bench holds what both modes of cowbench share: the result model
// (one row of latency statistics per operation, volume size and concurrency
// level), the recorder that runs a phase of tasks with a bounded number in
// flight and times each, and the progress display.
package bench

import (
	"context"
	"math"
	"slices"
	"time"

	"k8s.io/apimachinery/pkg/api/resource"
)

// Operation names. Both modes use the same names so that results compare;
// docs/COWBENCH.md says what each one times in each mode.
const (
	OpCreateVolume   = "CreateVolume"
	OpCtrlPublish    = "ControllerPublish"
	OpNodeStage      = "NodeStage"
	OpNodePublish    = "NodePublish"
	OpWrite          = "write"
	OpCreateSnapshot = "CreateSnapshot"
	OpNodeUnpublish  = "NodeUnpublish"
	OpNodeUnstage    = "NodeUnstage"
	OpCtrlUnpublish  = "ControllerUnpublish"
	OpRestore        = "restore"
	OpClone          = "clone"
	OpDeleteSnapshot = "DeleteSnapshot"
	OpDeleteVolume   = "DeleteVolume"
)

// Ops lists the operations in the order tables and plots show them: the
// benchmark's subject first, then the node-side steps that prepare the data.
var Ops = []string{
	OpCreateSnapshot, OpRestore, OpClone, OpDeleteSnapshot, OpDeleteVolume, OpCreateVolume,
	OpCtrlPublish, OpNodeStage, OpNodePublish, OpWrite, OpNodeUnpublish, OpNodeUnstage, OpCtrlUnpublish,
}

// IsSetup says whether op only prepares the data the snapshots hold (node
// staging, publishing, writing) rather than being what is benchmarked.
func IsSetup(op string) bool {
	switch op {
	case OpCtrlPublish, OpNodeStage, OpNodePublish, OpWrite, OpNodeUnpublish, OpNodeUnstage, OpCtrlUnpublish:
		return true
	}
	return false
}

// Result is one run of cowbench: what the JSON output holds.
type Result struct {
	Mode        string    `json:"mode"`    // csi or k8s
	Target      string    `json:"target"`  // the driver or the cluster measured
	Command     []string  `json:"command"` // the command line, to reproduce the run
	Started     time.Time `json:"started"`
	Seconds     float64   `json:"seconds"`
	Settings    []Setting `json:"settings"`
	Rows        []Row     `json:"rows"`
	Notes       []string  `json:"notes,omitempty"`
	Errors      []Failure `json:"errors,omitempty"`
	Interrupted string    `json:"interrupted,omitempty"` // why the run stopped early
}

// End records how long the run took since Started, and why ctx ended it
// early if it did.
func (r *Result) End(ctx context.Context) {
	if ctx.Err() != nil {
		r.Interrupted = context.Cause(ctx).Error()
	}
	r.Seconds = time.Since(r.Started).Seconds()
}

// Setting is one parameter of the run, shown above the table.
type Setting struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

// Row holds the statistics of one operation at one volume size and
// concurrency level. Latencies are in milliseconds.
type Row struct {
	Op          string  `json:"op"`
	Size        string  `json:"size"`
	SizeBytes   int64   `json:"size_bytes"`
	Concurrency int     `json:"concurrency"`
	Count       int     `json:"count"`  // operations that succeeded
	Errors      int     `json:"errors"` // operations that failed
	MinMs       float64 `json:"min_ms"`
	MeanMs      float64 `json:"mean_ms"`
	P50Ms       float64 `json:"p50_ms"`
	P90Ms       float64 `json:"p90_ms"`
	P99Ms       float64 `json:"p99_ms"`
	MaxMs       float64 `json:"max_ms"`
	// WallSeconds is how long the phase took from its first start to its
	// last end; OpsPerSecond = (count+errors)/WallSeconds.
	WallSeconds  float64 `json:"wall_seconds"`
	OpsPerSecond float64 `json:"ops_per_second"`
	// BytesPerSecond is set for the write operation: data written per second
	// over the phase, all writers together.
	BytesPerSecond float64 `json:"bytes_per_second,omitempty"`
	Setup          bool    `json:"setup,omitempty"` // see IsSetup
}

// Failure is one distinct error message of an operation, with how many
// times it occurred.
type Failure struct {
	Op          string `json:"op"`
	Size        string `json:"size"`
	Concurrency int    `json:"concurrency"`
	Message     string `json:"message"`
	Count       int    `json:"count"`
}

// Failed reports whether any operation of the run failed.
func (r *Result) Failed() bool {
	for _, row := range r.Rows {
		if row.Errors > 0 {
			return true
		}
	}
	return false
}

// SizeLabel writes a byte count as a Kubernetes quantity: 1073741824 is "1Gi".
func SizeLabel(n int64) string {
	return resource.NewQuantity(n, resource.BinarySI).String()
}

// Percentile returns the nearest-rank p-th percentile (0 < p <= 100) of
// sorted samples: the smallest sample with at least p% of the samples at or
// below it.
func Percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(math.Ceil(p / 100 * float64(len(sorted))))
	rank = min(max(rank, 1), len(sorted))
	return sorted[rank-1]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// newRow computes the statistics of a phase's samples.
func newRow(k Key, samples []time.Duration, errors int, wall time.Duration, bytes int64) Row {
	s := slices.Clone(samples)
	slices.Sort(s)
	r := Row{Op: k.Op, Size: SizeLabel(k.Size), SizeBytes: k.Size, Concurrency: k.Concurrency,
		Count: len(s), Errors: errors, WallSeconds: wall.Seconds(), Setup: IsSetup(k.Op)}
	if len(s) > 0 {
		var sum time.Duration
		for _, d := range s {
			sum += d
		}
		r.MinMs, r.MaxMs = ms(s[0]), ms(s[len(s)-1])
		r.MeanMs = ms(sum / time.Duration(len(s)))
		r.P50Ms, r.P90Ms, r.P99Ms = ms(Percentile(s, 50)), ms(Percentile(s, 90)), ms(Percentile(s, 99))
	}
	if wall > 0 {
		r.OpsPerSecond = float64(len(s)+errors) / wall.Seconds()
		if bytes > 0 {
			r.BytesPerSecond = float64(bytes) / wall.Seconds()
		}
	}
	return r
}
