// Package report writes a cowbench result as a terminal table, JSON, CSV,
// or a PNG plot of latency against volume size.
package report

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/cowcsi/cowcsi/cmd/cowbench/internal/bench"
)

// Table writes the result for a person: the settings, one table of the
// benchmarked operations, one of the node-side setup steps, then notes and
// the distinct errors.
func Table(w io.Writer, r *bench.Result) error {
	var b strings.Builder
	fmt.Fprintf(&b, "cowbench %s: %s\n", r.Mode, r.Target)
	for _, s := range r.Settings {
		fmt.Fprintf(&b, "  %-14s %s\n", s.Name, s.Value)
	}
	var main, setup []bench.Row
	for _, row := range r.Rows {
		if row.Setup {
			setup = append(setup, row)
		} else {
			main = append(main, row)
		}
	}
	b.WriteString("\n")
	if len(main) == 0 {
		b.WriteString("no operation completed\n")
	} else {
		writeRows(&b, main)
	}
	if len(setup) > 0 {
		b.WriteString("\nsetup: preparing the data the snapshots hold (for reference)\n")
		writeRows(&b, setup)
	}
	if len(r.Notes) > 0 {
		b.WriteString("\nnotes:\n")
		for _, n := range r.Notes {
			fmt.Fprintf(&b, "  - %s\n", n)
		}
	}
	if len(r.Errors) > 0 {
		b.WriteString("\nerrors:\n")
		for _, f := range r.Errors {
			fmt.Fprintf(&b, "  %s %s c=%d (%d×): %s\n", f.Op, f.Size, f.Concurrency, f.Count, f.Message)
		}
	}
	if r.Interrupted != "" {
		fmt.Fprintf(&b, "\nINTERRUPTED: %s; the table holds what completed before.\n", r.Interrupted)
	}
	fmt.Fprintf(&b, "\n%.1fs in all\n", r.Seconds)
	_, err := io.WriteString(w, b.String())
	return err
}

func writeRows(b *strings.Builder, rows []bench.Row) {
	header := []string{"operation", "size", "conc", "count", "errors", "p50", "p90", "p99", "max", "throughput"}
	right := []bool{false, true, true, true, true, true, true, true, true, true}
	cells := [][]string{header}
	prevOp := ""
	for _, r := range rows {
		if prevOp != "" && r.Op != prevOp {
			cells = append(cells, nil) // a blank line between operations
		}
		prevOp = r.Op
		tput := fmt.Sprintf("%.1f/s", r.OpsPerSecond)
		if r.BytesPerSecond > 0 {
			tput = bench.FormatRate(r.BytesPerSecond)
		}
		errs := strconv.Itoa(r.Errors)
		if r.Errors > 0 {
			errs += " !"
		}
		lat := func(v float64) string {
			if r.Count == 0 {
				return "-"
			}
			return bench.FormatMs(v)
		}
		cells = append(cells, []string{r.Op, r.Size, strconv.Itoa(r.Concurrency), strconv.Itoa(r.Count), errs,
			lat(r.P50Ms), lat(r.P90Ms), lat(r.P99Ms), lat(r.MaxMs), tput})
	}
	widths := make([]int, len(header))
	for _, row := range cells {
		for i, c := range row {
			widths[i] = max(widths[i], utf8.RuneCountInString(c))
		}
	}
	for _, row := range cells {
		if row == nil {
			b.WriteString("\n")
			continue
		}
		var line strings.Builder
		for i, c := range row {
			pad := strings.Repeat(" ", widths[i]-utf8.RuneCountInString(c))
			if i > 0 {
				line.WriteString("  ")
			}
			if right[i] {
				line.WriteString(pad + c)
			} else {
				line.WriteString(c + pad)
			}
		}
		b.WriteString(strings.TrimRight(line.String(), " ") + "\n")
	}
}
