package report

import (
	"encoding/csv"
	"encoding/json"
	"io"
	"strconv"

	"github.com/cowcsi/cowcsi/cmd/cowbench/internal/bench"
)

// JSON writes the whole result, settings, notes and errors included.
func JSON(w io.Writer, r *bench.Result) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// CSVHeader is the first line of the CSV output.
var CSVHeader = []string{"mode", "op", "size", "size_bytes", "concurrency", "count", "errors",
	"min_ms", "mean_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms", "wall_seconds", "ops_per_second", "bytes_per_second", "setup"}

// CSV writes one line per row, latencies in milliseconds.
func CSV(w io.Writer, r *bench.Result) error {
	cw := csv.NewWriter(w)
	if err := cw.Write(CSVHeader); err != nil {
		return err
	}
	f := func(v float64) string { return strconv.FormatFloat(v, 'f', 3, 64) }
	for _, row := range r.Rows {
		rec := []string{r.Mode, row.Op, row.Size, strconv.FormatInt(row.SizeBytes, 10), strconv.Itoa(row.Concurrency),
			strconv.Itoa(row.Count), strconv.Itoa(row.Errors), f(row.MinMs), f(row.MeanMs), f(row.P50Ms), f(row.P90Ms),
			f(row.P99Ms), f(row.MaxMs), f(row.WallSeconds), f(row.OpsPerSecond), f(row.BytesPerSecond), strconv.FormatBool(row.Setup)}
		if err := cw.Write(rec); err != nil {
			return err
		}
	}
	cw.Flush()
	return cw.Error()
}
