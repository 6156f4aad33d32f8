//! The one table `make bench` prints: a row per figure, with its reference,
//! the target and whether this run met it.

use std::fmt::Write as _;
use std::time::Duration;

/// Whether a figure met its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Met,
    NotMet,
    /// The figure could not be measured (the row says why).
    Failed,
    /// A figure without a target, reported only.
    Info,
}

impl Verdict {
    pub fn of(met: bool) -> Self {
        if met {
            Verdict::Met
        } else {
            Verdict::NotMet
        }
    }

    fn label(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::NotMet => "NOT met",
            Verdict::Failed => "NOT met (failed)",
            Verdict::Info => "info",
        }
    }
}

pub struct Row {
    pub figure: String,
    pub herald: String,
    pub reference: String,
    pub target: String,
    pub verdict: Verdict,
}

impl Row {
    pub fn new(
        figure: impl Into<String>,
        herald: impl Into<String>,
        reference: impl Into<String>,
        target: impl Into<String>,
        met: bool,
    ) -> Self {
        Row {
            figure: figure.into(),
            herald: herald.into(),
            reference: reference.into(),
            target: target.into(),
            verdict: Verdict::of(met),
        }
    }

    /// A figure without a target: reported, never met or missed.
    pub fn info(
        figure: impl Into<String>,
        herald: impl Into<String>,
        reference: impl Into<String>,
    ) -> Self {
        Row {
            figure: figure.into(),
            herald: herald.into(),
            reference: reference.into(),
            target: "none (info)".into(),
            verdict: Verdict::Info,
        }
    }

    /// A figure that could not be measured, with the error.
    /// The whole error goes to stderr at once; the row keeps its first line.
    pub fn failed(figure: impl Into<String>, target: impl Into<String>, error: &str) -> Self {
        let figure = figure.into();
        eprintln!("{figure}: {error}");
        let first_line = error.lines().next().unwrap_or_default();
        Row {
            figure,
            herald: format!("error: {first_line}"),
            reference: "-".into(),
            target: target.into(),
            verdict: Verdict::Failed,
        }
    }
}

/// The rows as a Markdown table (columns padded for the terminal).
pub fn render(rows: &[Row]) -> String {
    let header = ["figure", "herald", "reference", "target", "result"];
    let cells: Vec<[&str; 5]> = rows
        .iter()
        .map(|r| {
            [
                r.figure.as_str(),
                r.herald.as_str(),
                r.reference.as_str(),
                r.target.as_str(),
                r.verdict.label(),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &cells {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |row: &[&str; 5]| {
        let mut out = String::from("|");
        for (cell, width) in row.iter().zip(widths) {
            let pad = width - cell.chars().count();
            let _ = write!(out, " {cell}{} |", " ".repeat(pad));
        }
        out.push('\n');
        out
    };
    let mut out = line(&header);
    out.push('|');
    for width in widths {
        let _ = write!(out, "{}|", "-".repeat(width + 2));
    }
    out.push('\n');
    for row in &cells {
        out.push_str(&line(row));
    }
    out
}

/// `12345.6` as `12,346`.
pub fn int(value: f64) -> String {
    let digits = format!("{:.0}", value.abs());
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    if value < -0.5 {
        out.insert(0, '-');
    }
    out
}

/// A duration in milliseconds, `1.23 ms`.
pub fn ms(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1000.0)
}

/// KiB as MiB, `12.3 MiB`.
pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}
