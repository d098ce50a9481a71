package bench

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestPercentile(t *testing.T) {
	var s []time.Duration
	for i := 1; i <= 100; i++ {
		s = append(s, time.Duration(i))
	}
	for _, tc := range []struct {
		samples []time.Duration
		p       float64
		want    time.Duration
	}{
		{s, 50, 50}, {s, 90, 90}, {s, 99, 99}, {s, 100, 100},
		{s[:10], 99, 10}, {s[:10], 50, 5}, {s[:1], 50, 1}, {nil, 50, 0},
		{s[:3], 50, 2}, {s[:4], 50, 2},
	} {
		if got := Percentile(tc.samples, tc.p); got != tc.want {
			t.Errorf("p%v of %d samples = %v, want %v", tc.p, len(tc.samples), got, tc.want)
		}
	}
}

func TestFormatMs(t *testing.T) {
	for v, want := range map[float64]string{0.512: "512µs", 1.234: "1.23ms", 12.34: "12.3ms", 123.4: "123ms", 1234: "1.23s", 12345: "12.3s", 123456: "123s"} {
		if got := FormatMs(v); got != want {
			t.Errorf("FormatMs(%v) = %q, want %q", v, got, want)
		}
	}
}

// TestRecorder: samples of one key from several phases go into one row;
// failures are counted and kept by message; tasks that ctx ended are not
// failures.
func TestRecorder(t *testing.T) {
	r := NewRecorder(0, nil)
	k := Key{Op: OpCreateSnapshot, Size: 1 << 30, Concurrency: 2}
	boom := errors.New("boom")
	ok := func(context.Context) error { return nil }
	fail := func(context.Context) error { return boom }
	r.Run(t.Context(), Phase{Key: k, Planned: 3}, []Task{ok, fail, ok})
	errs := r.Run(t.Context(), Phase{Key: k, Planned: 2}, []Task{ok, fail})
	if errs[0] != nil || !errors.Is(errs[1], boom) {
		t.Errorf("errors %v", errs)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	r.Run(ctx, Phase{Key: k, Planned: 1}, []Task{ok})
	rows := r.Rows()
	if len(rows) != 1 || rows[0].Count != 3 || rows[0].Errors != 2 || rows[0].Size != "1Gi" {
		t.Fatalf("rows %+v, want one with count 3, errors 2", rows)
	}
	if f := r.Failures(); len(f) != 1 || f[0].Count != 2 || f[0].Message != "boom" {
		t.Errorf("failures %+v", f)
	}
}
