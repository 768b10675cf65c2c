//! The report: a table on stdout, `report.md`, `report.json` and `throughput.svg`.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

/// Everything one run measured.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    /// `full` or `quick`.
    pub(crate) mode: &'static str,
    /// The command that made it.
    pub(crate) command: String,
    /// The machine it ran on.
    pub(crate) machine: Machine,
    /// When it started (seconds since the Unix epoch).
    pub(crate) started_unix: u64,
    /// How long it took.
    pub(crate) seconds: f64,
    /// The floors and goals of the issue, each with its measured figure.
    pub(crate) floors: Vec<Floor>,
    /// The tables, in order.
    pub(crate) sections: Vec<Section>,
    /// Throughput against value size, for the plot.
    pub(crate) series: Vec<Series>,
}

/// The machine a report was made on.
#[derive(Debug, Serialize)]
pub(crate) struct Machine {
    pub(crate) cores: usize,
    pub(crate) memory_gib: f64,
    pub(crate) cpu: String,
    pub(crate) kernel: String,
    /// The 1-minute load average when the run started and when it ended: other work on
    /// the machine (above about 0.1) disturbs the figures.
    pub(crate) load_average: (f64, f64),
}

/// The 1-minute load average, from `/proc/loadavg`.
pub(crate) fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

impl Machine {
    /// This machine, from `/proc`.
    pub(crate) fn this() -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let memory_kib: f64 = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:").and_then(|r| r.split_whitespace().next()?.parse().ok()))
            .unwrap_or(0.0);
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: memory_kib / (1 << 20) as f64,
            cpu,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            load_average: (load_average(), f64::NAN),
        }
    }
}

/// One floor of the issue with what this run measured.
#[derive(Debug, Serialize)]
pub(crate) struct Floor {
    /// The figure, as the issue names it.
    pub(crate) figure: String,
    /// The measured figure, with its unit.
    pub(crate) measured: String,
    /// The number compared with the floor and the goal.
    pub(crate) value: f64,
    /// The floor, as text.
    pub(crate) floor: String,
    /// The goal, as text.
    pub(crate) goal: String,
    /// Whether the row has a floor at all (else it is a figure shown for information).
    pub(crate) checked: bool,
    /// Whether the floor holds.
    pub(crate) floor_met: bool,
    /// Whether the goal is reached.
    pub(crate) goal_met: bool,
    /// What the figure was set beside, and how it was taken.
    pub(crate) note: String,
}

/// Whether a floor's figure must stay at most, or reach at least, its limits.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Better {
    /// At most the floor (times, memory, ratios of cost).
    Lower,
    /// At least the floor (ratios of speed).
    Higher,
}

impl Floor {
    /// A floor row: `value` against `floor` and `goal`, shown with `show`.
    pub(crate) fn new(
        figure: impl Into<String>,
        value: f64,
        better: Better,
        (floor, goal): (f64, f64),
        show: impl Fn(f64) -> String,
        note: impl Into<String>,
    ) -> Floor {
        let (op, met): (&str, fn(f64, f64) -> bool) = match better {
            Better::Lower => ("<=", |v, l| v <= l),
            Better::Higher => (">=", |v, l| v >= l),
        };
        Floor {
            figure: figure.into(),
            measured: show(value),
            value,
            floor: format!("{op} {}", show(floor)),
            goal: format!("{op} {}", show(goal)),
            checked: true,
            floor_met: value.is_finite() && met(value, floor),
            goal_met: value.is_finite() && met(value, goal),
            note: note.into(),
        }
    }

    /// A figure shown beside the floors without one of its own.
    pub(crate) fn info(figure: impl Into<String>, measured: String, value: f64, note: impl Into<String>) -> Floor {
        Floor {
            figure: figure.into(),
            measured,
            value,
            floor: "-".into(),
            goal: "-".into(),
            checked: false,
            floor_met: true,
            goal_met: true,
            note: note.into(),
        }
    }

    /// Whether the row has a floor but no number to hold against it: its figure could not be
    /// measured on this machine (no `VmHWM`, say).
    pub(crate) fn unmeasured(&self) -> bool {
        self.checked && !self.value.is_finite()
    }

    fn status(&self) -> &'static str {
        match (self.checked, self.floor_met) {
            (false, _) => "info",
            (true, true) => "PASS",
            (true, false) => "MISS",
        }
    }

    fn goal_status(&self) -> &'static str {
        match (self.checked, self.goal_met) {
            (false, _) => "-",
            (true, true) => "met",
            (true, false) => "not met",
        }
    }
}

/// A table of figures with a sentence on what it measures.
#[derive(Debug, Serialize)]
pub(crate) struct Section {
    pub(crate) title: String,
    pub(crate) about: String,
    pub(crate) columns: Vec<String>,
    pub(crate) rows: Vec<Vec<String>>,
    /// The same figures as numbers.
    pub(crate) data: serde_json::Value,
}

impl Section {
    /// An empty table.
    pub(crate) fn new(title: &str, about: &str, columns: &[&str]) -> Section {
        Section {
            title: title.into(),
            about: about.into(),
            columns: columns.iter().map(|&c| c.to_owned()).collect(),
            rows: Vec::new(),
            data: serde_json::Value::Array(Vec::new()),
        }
    }

    /// Adds a row of cells.
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Adds a record to the numbers.
    pub(crate) fn data(&mut self, value: serde_json::Value) {
        if let serde_json::Value::Array(items) = &mut self.data {
            items.push(value);
        }
    }
}

/// Throughput against value size, one line of the plot.
#[derive(Debug, Serialize)]
pub(crate) struct Series {
    /// The line's name.
    pub(crate) name: String,
    /// The panel: `save` or `load`.
    pub(crate) panel: &'static str,
    /// A ceiling (drawn dashed), not workflow-context.
    pub(crate) ceiling: bool,
    /// (value size in bytes, GB/s).
    pub(crate) points: Vec<(u64, f64)>,
}

/// A text table with aligned columns.
fn text_table(columns: &[String], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = columns.iter().map(|c| c.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            let pad = w - cell.chars().count();
            // The first column is a label; the others are figures, aligned right.
            if i == 0 {
                let _ = write!(s, "{cell}{}  ", " ".repeat(pad));
            } else {
                let _ = write!(s, "{}{cell}  ", " ".repeat(pad));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(columns);
    out += &line(&widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>());
    for row in rows {
        out += &line(row);
    }
    out
}

fn md_table(columns: &[String], rows: &[Vec<String>]) -> String {
    let esc = |s: &String| s.replace('|', "\\|");
    let mut out = format!("| {} |\n", columns.iter().map(esc).collect::<Vec<_>>().join(" | "));
    // Figures align right; labels and words align left.
    let figure = |cell: &String| {
        cell.is_empty()
            || cell.starts_with(|c: char| c.is_ascii_digit() || "+-<>=(".contains(c))
            || cell.starts_with("value")
    };
    let align = (0..columns.len())
        .map(|i| if i > 0 && rows.iter().all(|r| r.get(i).is_none_or(figure)) { "---:|" } else { "---|" })
        .collect::<String>();
    out += &format!("|{align}\n");
    for row in rows {
        out += &format!("| {} |\n", row.iter().map(esc).collect::<Vec<_>>().join(" | "));
    }
    out
}

impl Report {
    fn floor_table(&self) -> (Vec<String>, Vec<Vec<String>>) {
        let columns = ["figure", "measured", "floor", "goal", "vs floor", "vs goal", "how"].map(String::from).to_vec();
        let rows = self
            .floors
            .iter()
            .map(|f| {
                vec![
                    f.figure.clone(),
                    f.measured.clone(),
                    f.floor.clone(),
                    f.goal.clone(),
                    f.status().into(),
                    f.goal_status().into(),
                    f.note.clone(),
                ]
            })
            .collect();
        (columns, rows)
    }

    fn header(&self) -> String {
        let m = &self.machine;
        format!(
            "{} run on {} cores, {:.0} GiB RAM, {}, Linux {}; took {:.0} s; load average {:.2} at the start, \
             {:.2} at the end (other work on the machine disturbs the figures).\nCommand: `{}`",
            self.mode,
            m.cores,
            m.memory_gib,
            m.cpu,
            m.kernel,
            self.seconds,
            m.load_average.0,
            m.load_average.1,
            self.command
        )
    }

    /// The whole report as text for the terminal (the floors' notes under their table).
    pub(crate) fn text(&self) -> String {
        let mut out = format!("\n{}\n\n== Floors and goals ==\n", self.header());
        let (mut columns, mut rows) = self.floor_table();
        columns.pop();
        let notes: Vec<String> = rows.iter_mut().filter_map(|r| r.pop()).collect();
        out += &text_table(&columns, &rows);
        out += "\nHow each was taken:\n";
        for (row, note) in rows.iter().zip(notes) {
            out += &format!("- {}: {note}\n", row[0]);
        }
        for s in &self.sections {
            out += &format!("\n== {} ==\n{}\n", s.title, s.about);
            out += &text_table(&s.columns, &s.rows);
        }
        out
    }

    /// The whole report as Markdown.
    pub(crate) fn markdown(&self) -> String {
        let mut out = format!("# Benchmark report ({})\n\n{}\n\n## Floors and goals\n\n", self.mode, self.header());
        let (columns, rows) = self.floor_table();
        out += &md_table(&columns, &rows);
        for s in &self.sections {
            out += &format!("\n## {}\n\n{}\n\n", s.title, s.about);
            out += &md_table(&s.columns, &s.rows);
        }
        out
    }

    /// Writes `report.md`, `report.json` and `throughput.svg` into `dir`.
    pub(crate) fn write(&self, dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(self)? + "\n")?;
        self.plot(&dir.join("throughput.svg"))?;
        Ok(())
    }

    /// Draws throughput against value size, one panel for saves and one for loads.
    fn plot(&self, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(path, (1100, 1200)).into_drawing_area();
        root.fill(&WHITE)?;
        let panels = root.split_evenly((2, 1));
        let titles = [("save", "Save: GB/s against value size"), ("load", "Load: GB/s against value size")];
        for (area, (panel, title)) in panels.iter().zip(titles) {
            let series: Vec<&Series> =
                self.series.iter().filter(|s| s.panel == panel && !s.points.is_empty()).collect();
            let points =
                || series.iter().flat_map(|s| s.points.iter().copied()).filter(|p| p.1 > 0.0 && p.1.is_finite());
            let (Some(x_max), Some(y_min), Some(y_max)) = (
                points().map(|p| p.0 as f64).reduce(f64::max),
                points().map(|p| p.1).reduce(f64::min),
                points().map(|p| p.1).reduce(f64::max),
            ) else {
                continue;
            };
            let mut chart = ChartBuilder::on(area)
                .caption(title, ("sans-serif", 22))
                .margin(15)
                .x_label_area_size(45)
                .y_label_area_size(70)
                .build_cartesian_2d((32f64..x_max * 2.0).log_scale(), (y_min / 2.0..y_max * 2.0).log_scale())?;
            chart
                .configure_mesh()
                .x_desc(
                    "value size (bytes; the sizes measured are 64 B, 1 KiB, 64 KiB, 1 MiB, 5.9 MiB, 64 MiB, 256 MiB)",
                )
                .y_desc("GB/s")
                .x_label_formatter(&|v| size_label(*v))
                .y_label_formatter(&|v| format!("{v}"))
                .draw()?;
            for (i, s) in series.iter().enumerate() {
                let (r, g, b) = COLORS[i % COLORS.len()];
                let color = RGBColor(r, g, b).to_rgba();
                let data: Vec<(f64, f64)> =
                    s.points.iter().filter(|p| p.1 > 0.0 && p.1.is_finite()).map(|&(x, y)| (x as f64, y)).collect();
                let style = color.stroke_width(if s.ceiling { 1 } else { 2 });
                let drawn = if s.ceiling {
                    chart.draw_series(DashedLineSeries::new(data, 6, 4, style))?
                } else {
                    chart.draw_series(LineSeries::new(data, style).point_size(3))?
                };
                drawn.label(&s.name).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()?;
        }
        root.present()?;
        Ok(())
    }
}

/// Distinct line colours (matplotlib's tab10).
const COLORS: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

/// `100 B`, `10 kB`, `1 MB` for an axis whose ticks fall on powers of ten.
fn size_label(bytes: f64) -> String {
    match bytes {
        b if b >= 1e9 => format!("{} GB", b / 1e9),
        b if b >= 1e6 => format!("{} MB", b / 1e6),
        b if b >= 1e3 => format!("{} kB", b / 1e3),
        b => format!("{b} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floors_compare_both_ways() {
        let f = Floor::new("t", 3.0, Better::Lower, (20.0, 5.0), |v| format!("{v} us"), "");
        assert!(f.floor_met && f.goal_met);
        assert_eq!(f.floor, "<= 20 us");
        let f = Floor::new("r", 0.85, Better::Higher, (0.8, 0.9), |v| format!("{v}x"), "");
        assert!(f.floor_met && !f.goal_met);
        let f = Floor::new("n", f64::NAN, Better::Lower, (1.0, 1.0), |v| format!("{v}"), "");
        assert!(!f.floor_met && f.unmeasured());
        assert!(!Floor::new("m", 30.0, Better::Lower, (20.0, 5.0), |v| format!("{v}"), "").unmeasured());
        assert!(!Floor::info("i", "n/a".into(), f64::NAN, "").unmeasured(), "an info row has no floor to miss");
    }

    #[test]
    fn tables_align() {
        let t = text_table(&["a".into(), "bb".into()], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "a    bb\n---  --\nxyz   1\n");
        let m = md_table(&["a".into(), "b".into()], &[vec!["x|y".into(), "1".into()]]);
        assert_eq!(m, "| a | b |\n|---|---:|\n| x\\|y | 1 |\n");
        assert_eq!(size_label(1e7), "10 MB");
        assert_eq!(size_label(100.0), "100 B");
    }
}
