package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
)

// pooled is one row's per-round figures over one or more reports of the
// same side of a comparison (old or new code).
type pooled struct {
	name   string
	ratios []float64 // B/A of every round
	cpu    []float64 // cpu B/A of every round
}

// savedReport is the part of a bench-io JSON report that -compare reads
// (the fields of report and row it needs).
type savedReport struct {
	Rows []savedRow `json:"rows"`
}

type savedRow struct {
	ID     string    `json:"id"`
	Name   string    `json:"name"`
	Unit   string    `json:"unit"`
	Ratios []float64 `json:"ratios"`
	CPU    []float64 `json:"cpu_per_io_ratios"`
}

// loadPooled reads bench-io JSON reports and pools each row's rounds by
// row ID, in the order rows first appear.
func loadPooled(paths []string) (ids []string, rows map[string]*pooled, err error) {
	rows = map[string]*pooled{}
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, nil, err
		}
		var rep savedReport
		if err := json.Unmarshal(b, &rep); err != nil {
			return nil, nil, fmt.Errorf("%s: %w", p, err)
		}
		if len(rep.Rows) == 0 {
			return nil, nil, fmt.Errorf("%s: no rows (not a bench-io report?)", p)
		}
		for _, r := range rep.Rows {
			pr := rows[r.ID]
			if pr == nil {
				pr = &pooled{name: r.Name + " (" + r.Unit + ")"}
				rows[r.ID] = pr
				ids = append(ids, r.ID)
			}
			pr.ratios = append(pr.ratios, r.Ratios...)
			pr.cpu = append(pr.cpu, r.CPU...)
		}
	}
	return ids, rows, nil
}

// verdict compares the rounds of two sides of a row. On a shared, noisy
// machine a shift of the median alone means little: a change is called
// lower or higher only when every round of one side lies below every
// round of the other.
func verdict(old, cur []float64) string {
	switch {
	case len(old) == 0 || len(cur) == 0:
		return "-"
	case slices.Max(cur) < slices.Min(old):
		return "LOWER"
	case slices.Min(cur) > slices.Max(old):
		return "higher"
	}
	return "ranges overlap"
}

// compareReports prints, for every row, the old and the new code's ratio to
// the limit (median and range of all their rounds) and the verdict. Rows
// present on one side only are listed as such. It returns the IDs of the
// rows whose new rounds all lie below the old ones.
func compareReports(w io.Writer, oldPaths, newPaths []string) ([]string, error) {
	oldIDs, oldRows, err := loadPooled(oldPaths)
	if err != nil {
		return nil, err
	}
	newIDs, newRows, err := loadPooled(newPaths)
	if err != nil {
		return nil, err
	}
	ids := slices.Clone(newIDs)
	for _, id := range oldIDs {
		if newRows[id] == nil {
			ids = append(ids, id)
		}
	}
	fmt.Fprintf(w, "\nold: %s\nnew: %s\nB/A as in the run's table (to the limit; depth 64 to depth 1), median [min-max] of all rounds of each side's reports; cpu B/A medians\n\n",
		strings.Join(oldPaths, ", "), strings.Join(newPaths, ", "))
	fmt.Fprintf(w, "%-52s %-24s %-24s %-9s %-9s %s\n", "row", "old B/A", "new B/A", "old cpu", "new cpu", "new vs old")
	side := func(p *pooled) (ratio, cpu string) {
		if p == nil || len(p.ratios) == 0 {
			return "(not run)", ""
		}
		return fmt.Sprintf("%.2f [%.2f-%.2f] n=%d", median(p.ratios), slices.Min(p.ratios), slices.Max(p.ratios), len(p.ratios)),
			fmt.Sprintf("%.2f", median(p.cpu))
	}
	var lower []string
	for _, id := range ids {
		o, n := oldRows[id], newRows[id]
		name := id
		if n != nil {
			name = n.name
		} else if o != nil {
			name = o.name
		}
		or, oc := side(o)
		nr, nc := side(n)
		v := "-"
		if o != nil && n != nil {
			v = verdict(o.ratios, n.ratios)
			if v == "LOWER" {
				lower = append(lower, id)
			}
		}
		fmt.Fprintf(w, "%-52s %-24s %-24s %-9s %-9s %s\n", name, or, nr, oc, nc, v)
	}
	fmt.Fprintf(w, "\nLOWER/higher: every round of the new code below/above every round of the old; otherwise the ranges overlap\n")
	return lower, nil
}
