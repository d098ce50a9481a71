package main

import (
	"slices"
	"testing"
)

func TestFlagValues(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []int64
		bad  bool
	}{
		{in: "1Gi,16Gi,256Gi", want: []int64{1 << 30, 16 << 30, 256 << 30}},
		{in: "64Mi, 1G", want: []int64{64 << 20, 1e9}},
		{in: "1.5Gi", want: []int64{3 << 29}},
		{in: "0", bad: true},
		{in: "1GB", bad: true},
		{in: "-1Gi", bad: true},
		{in: "", bad: true},
	} {
		var q quantities
		err := q.Set(tc.in)
		if (err != nil) != tc.bad || (!tc.bad && !slices.Equal(q, tc.want)) {
			t.Errorf("sizes %q: %v, %v; want %v (error: %v)", tc.in, q, err, tc.want, tc.bad)
		}
	}
	for _, tc := range []struct {
		in   string
		want []output
		bad  bool
	}{
		{in: "table", want: []output{{format: "table"}}},
		{in: "table,json=a.json,csv=b.csv", want: []output{{"table", ""}, {"json", "a.json"}, {"csv", "b.csv"}}},
		{in: "json=-", want: []output{{format: "json"}}},
		{in: "table,json", bad: true}, // two on stdout
		{in: "yaml", bad: true},
	} {
		var o outputs
		err := o.Set(tc.in)
		if (err != nil) != tc.bad || (!tc.bad && !slices.Equal(o, tc.want)) {
			t.Errorf("output %q: %v, %v; want %v (error: %v)", tc.in, o, err, tc.want, tc.bad)
		}
	}
	var c ints
	if err := c.Set("1,4,16"); err != nil || !slices.Equal(c, ints{1, 4, 16}) {
		t.Errorf("concurrency: %v %v", c, err)
	}
	if err := c.Set("0"); err == nil {
		t.Error("concurrency 0 accepted")
	}
	var kv keyValues
	if err := kv.Set("cowcsi.io/freeze=false,a=b=c"); err != nil || kv["cowcsi.io/freeze"] != "false" || kv["a"] != "b=c" {
		t.Errorf("parameters: %v %v", kv, err)
	}
}

// TestUsageErrors: bad flags exit with 2 before anything runs.
func TestUsageErrors(t *testing.T) {
	for _, args := range [][]string{
		{},
		{"frobnicate"},
		{"csi", "--sizes", "1GB"},
		{"csi", "--access", "file"},
		{"csi", "--endpoint", "unix:///x", "--start-driver"},
		{"csi", "--sizes", "64Mi", "--write", "128Mi", "--endpoint", "unix:///x"},
		{"csi", "extra"},
	} {
		if code, _, _ := cowbench(t, t.Context(), args...); code != exitSetup {
			t.Errorf("%q: exit %d, want %d", args, code, exitSetup)
		}
	}
	if code, _, _ := cowbench(t, t.Context(), "csi", "-h"); code != exitOK {
		t.Errorf("-h: exit %d", code)
	}
}
