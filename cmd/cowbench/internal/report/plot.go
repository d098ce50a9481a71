package report

import (
	"errors"
	"fmt"
	"image/color"
	"math"
	"os"
	"slices"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/font"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"

	"github.com/cowcsi/cowcsi/cmd/cowbench/internal/bench"
)

// Plot draws latency against volume size into a PNG file: one panel per
// concurrency level, one line per benchmarked operation through the p50
// latencies, with a bar from the fastest operation to the p99. Both axes are
// logarithmic: sizes span orders of magnitude, and so do the operations.
func Plot(path string, r *bench.Result) error {
	concs, sizes, ops := plotKeys(r)
	if len(concs) == 0 {
		return errors.New("plot: no operation completed, nothing to draw")
	}
	yMin, yMax := latencyRange(r)
	grid, legend, err := panels(r, concs, sizes, ops, yMin, yMax)
	if err != nil {
		return err
	}
	img := drawPlot(r, grid, legend)
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// plotKeys returns the concurrency levels, sizes and operations of the
// rows that measured something, sorted.
func plotKeys(r *bench.Result) (concs []int, sizes []int64, ops []string) {
	for _, row := range r.Rows {
		if row.Setup || row.Count == 0 {
			continue
		}
		if !slices.Contains(concs, row.Concurrency) {
			concs = append(concs, row.Concurrency)
		}
		if !slices.Contains(sizes, row.SizeBytes) {
			sizes = append(sizes, row.SizeBytes)
		}
		if !slices.Contains(ops, row.Op) {
			ops = append(ops, row.Op)
		}
	}
	slices.Sort(concs)
	slices.Sort(sizes)
	// Keep the order of bench.Ops, so colours mean the same in every panel.
	slices.SortStableFunc(ops, func(a, b string) int { return slices.Index(bench.Ops, a) - slices.Index(bench.Ops, b) })
	return concs, sizes, ops
}

// latencyRange is the latency axis: whole decades around every row's
// fastest and p99, the same in every panel, so panels compare.
func latencyRange(r *bench.Result) (yMin, yMax float64) {
	yMin, yMax = math.Inf(1), math.Inf(-1)
	for _, row := range r.Rows {
		if !row.Setup && row.Count > 0 {
			yMin, yMax = math.Min(yMin, math.Max(row.MinMs, 1e-3)), math.Max(yMax, row.P99Ms)
		}
	}
	yMin = math.Pow(10, math.Floor(math.Log10(yMin)))
	yMax = math.Pow(10, math.Ceil(math.Log10(math.Max(yMax, yMin*10))))
	return yMin, yMax
}

// panels lays out one panel per concurrency level, up to three a row, and
// the legend of the operations.
func panels(r *bench.Result, concs []int, sizes []int64, ops []string, yMin, yMax float64) ([][]*plot.Plot, *plot.Legend, error) {
	cols := min(len(concs), 3)
	rows := (len(concs) + cols - 1) / cols
	grid := make([][]*plot.Plot, rows)
	for i := range grid {
		grid[i] = make([]*plot.Plot, cols)
	}
	legend := plot.NewLegend()
	legend.Top, legend.Left = true, true
	for i, c := range concs {
		p, err := panel(r, c, sizes, ops, yMin, yMax, &legend, i == 0)
		if err != nil {
			return nil, nil, err
		}
		grid[i/cols][i%cols] = p
	}
	for i := len(concs); i < rows*cols; i++ {
		grid[i/cols][i%cols] = plot.New() // an empty tile
		grid[i/cols][i%cols].HideAxes()
	}
	return grid, &legend, nil
}

// drawPlot draws the title, the panels of grid and the legend on a white
// image.
func drawPlot(r *bench.Result, grid [][]*plot.Plot, legend *plot.Legend) *vgimg.Canvas {
	rows, cols := len(grid), len(grid[0])
	const titleH, legendW = 0.45 * vg.Inch, 1.7 * vg.Inch
	w, h := vg.Length(cols)*5.5*vg.Inch+legendW, vg.Length(rows)*4.5*vg.Inch+titleH
	img := vgimg.NewWith(vgimg.UseWH(w, h), vgimg.UseDPI(110))
	dc := draw.New(img)
	dc.SetColor(color.White)
	dc.Fill(dc.Rectangle.Path())
	title := fmt.Sprintf("cowbench %s: %s", r.Mode, r.Target)
	dc.FillText(draw.TextStyle{Color: color.Black, Font: font.From(plot.DefaultFont, 13), Handler: plot.DefaultTextHandler},
		vg.Point{X: 0.3 * vg.Inch, Y: h - 0.3*vg.Inch}, title)
	body := draw.Crop(dc, 0, -legendW, 0, -titleH)
	tiles := draw.Tiles{Rows: rows, Cols: cols, PadX: vg.Millimeter * 6, PadY: vg.Millimeter * 6,
		PadTop: vg.Millimeter * 2, PadBottom: vg.Millimeter * 2, PadLeft: vg.Millimeter * 2, PadRight: vg.Millimeter * 2}
	canvases := plot.Align(grid, tiles, body)
	for i := range grid {
		for j := range grid[i] {
			grid[i][j].Draw(canvases[i][j])
		}
	}
	legend.Draw(draw.Crop(dc, w-legendW+vg.Millimeter*2, 0, 0, -titleH-vg.Inch*0.5))
	note := draw.TextStyle{Color: color.Gray{Y: 80}, Font: font.From(plot.DefaultFont, 9), Handler: plot.DefaultTextHandler}
	dc.FillText(note, vg.Point{X: w - legendW + vg.Millimeter*2, Y: h - titleH - 0.3*vg.Inch}, "point: p50; bar: min to p99")
	return img
}

// palette: the Tableau 10 colours, distinct for the six operations.
var palette = []color.Color{
	color.RGBA{78, 121, 167, 255}, color.RGBA{242, 142, 43, 255}, color.RGBA{89, 161, 79, 255},
	color.RGBA{225, 87, 89, 255}, color.RGBA{176, 122, 161, 255}, color.RGBA{118, 183, 178, 255},
	color.RGBA{237, 201, 72, 255}, color.RGBA{255, 157, 167, 255}, color.RGBA{156, 117, 95, 255},
	color.RGBA{186, 176, 172, 255},
}

func opColor(op string) color.Color {
	return palette[max(0, slices.Index(bench.Ops, op))%len(palette)]
}

// errPoints are XY points with asymmetric Y error bars.
type errPoints struct {
	plotter.XYs
	plotter.YErrors
}

func panel(r *bench.Result, conc int, sizes []int64, ops []string, yMin, yMax float64, legend *plot.Legend, addLegend bool) (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = fmt.Sprintf("concurrency %d", conc)
	p.X.Label.Text = "volume size"
	p.Y.Label.Text = "latency"
	p.X.Scale, p.Y.Scale = plot.LogScale{}, plot.LogScale{}
	var ticks plot.ConstantTicks
	for _, s := range sizes {
		ticks = append(ticks, plot.Tick{Value: float64(s), Label: bench.SizeLabel(s)})
	}
	p.X.Tick.Marker = ticks
	p.Y.Tick.Marker = msTicks{}
	p.X.Min, p.X.Max = float64(sizes[0])/1.6, float64(sizes[len(sizes)-1])*1.6
	p.Y.Min, p.Y.Max = yMin, yMax
	p.Add(plotter.NewGrid())
	for i, op := range ops {
		var pts errPoints
		// Spread the operations sideways a little so their bars do not
		// hide each other.
		shift := math.Pow(2, 0.08*(float64(i)-float64(len(ops)-1)/2))
		for _, row := range r.Rows {
			if row.Op != op || row.Concurrency != conc || row.Count == 0 || row.Setup {
				continue
			}
			lo, mid, hi := math.Max(row.MinMs, 1e-3), math.Max(row.P50Ms, 1e-3), math.Max(row.P99Ms, 1e-3)
			pts.XYs = append(pts.XYs, plotter.XY{X: float64(row.SizeBytes) * shift, Y: mid})
			pts.YErrors = append(pts.YErrors, struct{ Low, High float64 }{mid - lo, hi - mid})
		}
		line, points, err := plotter.NewLinePoints(pts.XYs)
		if err != nil {
			return nil, err
		}
		line.Color, points.Color = opColor(op), opColor(op)
		line.Width = vg.Points(1.5)
		points.Shape = plotutil.Shape(i)
		points.Radius = vg.Points(3.5)
		if addLegend {
			legend.Add(op, line, points)
		}
		if len(pts.XYs) == 0 {
			continue
		}
		bars, err := plotter.NewYErrorBars(pts)
		if err != nil {
			return nil, err
		}
		bars.Color = opColor(op)
		p.Add(line, points, bars)
	}
	return p, nil
}

// msTicks labels a logarithmic millisecond axis at 1, 2 and 5 times each
// power of ten, in the units of bench.FormatMs.
type msTicks struct{}

func (msTicks) Ticks(lo, hi float64) []plot.Tick {
	var ticks []plot.Tick
	for e := math.Floor(math.Log10(lo)); e <= math.Ceil(math.Log10(hi)); e++ {
		for _, m := range []float64{1, 2, 5} {
			v := m * math.Pow(10, e)
			if v < lo || v > hi {
				continue
			}
			label := ""
			if m == 1 {
				label = tickLabel(v)
			}
			ticks = append(ticks, plot.Tick{Value: v, Label: label})
		}
	}
	return ticks
}

// tickLabel writes a power of ten of milliseconds: 100µs, 1ms, 10s.
func tickLabel(ms float64) string {
	switch {
	case ms < 1:
		return fmt.Sprintf("%gµs", math.Round(ms*1000))
	case ms < 1000:
		return fmt.Sprintf("%gms", ms)
	}
	return fmt.Sprintf("%gs", ms/1000)
}
