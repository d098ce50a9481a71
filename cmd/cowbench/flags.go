package main

import (
	"errors"
	"flag"
	"fmt"
	"strconv"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/cowcsi/cowcsi/cmd/cowbench/internal/bench"
)

// quantities is a comma-separated list of Kubernetes quantities: 1Gi,16Gi.
type quantities []int64

func (q *quantities) String() string {
	var s []string
	for _, v := range *q {
		s = append(s, bench.SizeLabel(v))
	}
	return strings.Join(s, ",")
}

func (q *quantities) Set(v string) error {
	var out []int64
	for _, f := range strings.Split(v, ",") {
		n, err := parseQuantity(strings.TrimSpace(f))
		if err != nil {
			return err
		}
		if n <= 0 {
			return fmt.Errorf("%q is not a positive size", f)
		}
		out = append(out, n)
	}
	*q = out
	return nil
}

// quantity is one Kubernetes quantity (0 allowed).
type quantity int64

func (q *quantity) String() string { return bench.SizeLabel(int64(*q)) }
func (q *quantity) Set(v string) error {
	n, err := parseQuantity(v)
	if err != nil {
		return err
	}
	if n < 0 {
		return fmt.Errorf("%q is negative", v)
	}
	*q = quantity(n)
	return nil
}

func parseQuantity(s string) (int64, error) {
	q, err := resource.ParseQuantity(s)
	if err != nil {
		return 0, fmt.Errorf("%q is not a Kubernetes quantity such as 64Mi, 1Gi or 1G: %v", s, err)
	}
	return q.Value(), nil
}

// ints is a comma-separated list of positive integers: 1,4,16.
type ints []int

func (l *ints) String() string {
	var s []string
	for _, v := range *l {
		s = append(s, strconv.Itoa(v))
	}
	return strings.Join(s, ",")
}

func (l *ints) Set(v string) error {
	var out []int
	for _, f := range strings.Split(v, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return fmt.Errorf("%q is not a positive integer", f)
		}
		out = append(out, n)
	}
	*l = out
	return nil
}

// keyValues is k=v,k2=v2.
type keyValues map[string]string

func (m *keyValues) String() string {
	var s []string
	for k, v := range *m {
		s = append(s, k+"="+v)
	}
	return strings.Join(s, ",")
}

func (m *keyValues) Set(v string) error {
	if *m == nil {
		*m = map[string]string{}
	}
	for _, f := range strings.Split(v, ",") {
		k, val, ok := strings.Cut(f, "=")
		if !ok || k == "" {
			return fmt.Errorf("%q: want key=value", f)
		}
		(*m)[k] = val
	}
	return nil
}

// outputs is --output: format[=file],... with format table, json or csv;
// without a file the format goes to stdout.
type outputs []output

type output struct{ format, path string }

func (o *outputs) String() string {
	var s []string
	for _, x := range *o {
		if x.path == "" {
			s = append(s, x.format)
		} else {
			s = append(s, x.format+"="+x.path)
		}
	}
	return strings.Join(s, ",")
}

func (o *outputs) Set(v string) error {
	var out outputs
	stdout := 0
	for _, f := range strings.Split(v, ",") {
		format, path, _ := strings.Cut(strings.TrimSpace(f), "=")
		switch format {
		case "table", "json", "csv":
		default:
			return fmt.Errorf("%q: want table, json or csv, each optionally =FILE", f)
		}
		if path == "" || path == "-" {
			path = ""
			stdout++
		}
		out = append(out, output{format, path})
	}
	if stdout > 1 {
		return errors.New("only one format can go to stdout; give the others a file (json=run.json)")
	}
	*o = out
	return nil
}

// common are the flags both modes have.
type common struct {
	sizes          quantities
	concurrency    ints
	volumes        int
	snapshots      int
	access         string
	clone          bool
	outputs        outputs
	plot           string
	timeout        time.Duration
	opTimeout      time.Duration
	cleanupTimeout time.Duration
	quiet          bool
}

// plan is what the common flags ask to measure.
func (c *common) plan() bench.Plan {
	return bench.Plan{Sizes: c.sizes, Concurrency: c.concurrency, Volumes: c.volumes, Snapshots: c.snapshots,
		Access: c.access, Clone: c.clone}
}

// newFlags returns the flag set of a mode with the common flags added.
func newFlags(mode, defaultSizes string) (*flag.FlagSet, *common) {
	fs := flag.NewFlagSet(mode, flag.ContinueOnError)
	c := &common{}
	c.addFlags(fs, defaultSizes)
	return fs, c
}

func (c *common) addFlags(fs *flag.FlagSet, defaultSizes string) {
	c.sizes = quantities{}
	_ = c.sizes.Set(defaultSizes)
	c.concurrency = ints{1, 4}
	c.outputs = outputs{{format: "table"}}
	fs.Var(&c.sizes, "sizes", "volume sizes, Kubernetes quantities, comma-separated")
	fs.Var(&c.concurrency, "concurrency", "concurrency levels: operations of a kind in flight at once, one pass per level")
	fs.IntVar(&c.volumes, "volumes", 0, "source volumes per size and concurrency level (0: twice the level, at least 4)")
	fs.IntVar(&c.snapshots, "snapshots", 4, "snapshots of each source volume; each is restored once")
	fs.StringVar(&c.access, "access", "block", "volume access type: block or mount (a filesystem)")
	fs.BoolVar(&c.clone, "clone", true, "also measure clones (a volume from a volume)")
	fs.Var(&c.outputs, "output", "output formats, comma-separated: table, json, csv, each to stdout or =FILE (table,json=run.json)")
	fs.StringVar(&c.plot, "plot", "", "draw latency against volume size into this PNG file")
	fs.DurationVar(&c.timeout, "timeout", 0, "stop measuring after this long and clean up (0: no limit)")
	fs.DurationVar(&c.opTimeout, "op-timeout", 5*time.Minute, "limit of one operation; one that takes longer counts as failed")
	fs.DurationVar(&c.cleanupTimeout, "cleanup-timeout", 5*time.Minute, "limit of the cleanup at the end")
	fs.BoolVar(&c.quiet, "quiet", false, "no progress on stderr")
}
