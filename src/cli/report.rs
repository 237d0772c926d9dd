//! `eva report DIR`: the rank distribution of an adapter eva wrote (per module type and per
//! block), its unconverged layers, layers whose input has no variance, uncertified allocations
//! and the run's time split, read from `eva_report.json` alone, so older directories without the
//! picture or card work too.

use crate::adapter::grid::{Grid, RankStats};
use crate::adapter::report::Report;
use crate::adapter::write::{CARD_FILE, REPORT_FILE, SVG_FILE};
use crate::{Error, Result};
use clap::Args;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Arguments of `eva report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// An output directory written by `eva init`.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,

    /// Print eva_report.json as it is instead of the summary.
    #[arg(long)]
    pub json: bool,
}

/// Most layer names listed under one heading before the rest are counted.
const MAX_LISTED: usize = 20;

/// Reads `DIR/eva_report.json`: its bytes and the parsed report.
pub fn load(dir: &Path) -> Result<(Vec<u8>, Report)> {
    let path = dir.join(REPORT_FILE);
    if !dir.is_dir() {
        return Err(Error::data(format!(
            "{} is not a directory (expected an output directory of eva init)",
            dir.display()
        )));
    }
    if !path.is_file() {
        return Err(Error::data(format!(
            "{} has no {REPORT_FILE} (expected an output directory of eva init)",
            dir.display()
        )));
    }
    let bytes = std::fs::read(&path).map_err(|e| Error::io("cannot read", &path, e))?;
    let report = serde_json::from_slice(&bytes)
        .map_err(|e| Error::data(format!("{} is not an eva report: {e}", path.display())))?;
    Ok((bytes, report))
}

fn list(out: &mut String, heading: &str, items: &[String]) {
    if items.is_empty() {
        let _ = writeln!(out, "{heading:<15} none");
        return;
    }
    let _ = writeln!(out, "{heading:<15} {} layer(s):", items.len());
    for it in items.iter().take(MAX_LISTED) {
        let _ = writeln!(out, "  {it}");
    }
    if items.len() > MAX_LISTED {
        let _ = writeln!(
            out,
            "  ... and {} more (see {REPORT_FILE})",
            items.len() - MAX_LISTED
        );
    }
}

fn seconds(t: f64, total: f64) -> String {
    if total > 0.0 {
        format!("{t:.2} s ({:.0}%)", 100.0 * t / total)
    } else {
        format!("{t:.2} s")
    }
}

fn bytes(b: f64) -> String {
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.2} MiB", b / (1u64 << 20) as f64)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

/// The summary `eva report` prints for the directory `dir` holding `report`.
pub fn summary(dir: &Path, report: &Report) -> String {
    let grid = Grid::new(report);
    let all = RankStats::of(report.layers.iter().map(|l| l.rank));
    let mut s = String::new();
    let _ = writeln!(s, "eva report {}", dir.display());
    let _ = writeln!(s, "{:<15} {}", "source", report.source);
    let _ = writeln!(
        s,
        "{:<15} {} steps of {} units ({} of {} units), stop: {}, {} rank(s) ({}), eva {}",
        "run",
        report.steps,
        report.batch_size,
        report.units_seen,
        report.units_total,
        report.stop_reason,
        report.world_size,
        report.backend,
        report.eva_version
    );
    let _ = writeln!(
        s,
        "{:<15} sum {} {} budget {} (r {} × {} layers, rho {}): {} kept, {} dropped (rank 0), range {}..{}",
        "ranks",
        all.total,
        if all.total == report.rank_budget { "=" } else { "≠" },
        report.rank_budget,
        report.r,
        report.layers.len(),
        report.rho,
        all.layers - all.dropped,
        all.dropped,
        all.min,
        all.max
    );

    // Per module type.
    let types = grid.by_type();
    let tw = types
        .iter()
        .map(|(t, _)| t.chars().count())
        .max()
        .unwrap_or(4)
        .max(11);
    let _ = writeln!(
        s,
        "\nper module type\n  {:<tw$} {:>6} {:>6} {:>5} {:>6} {:>5}",
        "type", "layers", "total", "min", "mean", "max"
    );
    for (t, st) in &types {
        let _ = writeln!(
            s,
            "  {t:<tw$} {:>6} {:>6} {:>5} {:>6.1} {:>5}",
            st.layers,
            st.total,
            st.min,
            st.mean(),
            st.max
        );
    }

    // Per block: a blocks × types matrix of ranks, with the block's total.
    let blocked: Vec<usize> = (0..grid.rows.len())
        .filter(|r| Some(*r) != grid.other)
        .collect();
    if !grid.columns.is_empty() {
        let widths: Vec<usize> = blocked
            .iter()
            .map(|&r| grid.rows[r].chars().count().max(3))
            .collect();
        let _ = write!(s, "\nper block (ranks)\n  {:>5}", "block");
        for (&r, w) in blocked.iter().zip(&widths) {
            let _ = write!(s, " {:>w$}", grid.rows[r]);
        }
        let _ = writeln!(s, " {:>6}", "total");
        for (i, (b, st)) in grid.by_block().into_iter().enumerate() {
            let _ = write!(s, "  {b:>5}");
            for (&r, w) in blocked.iter().zip(&widths) {
                match grid.at(r, i) {
                    Some(c) => {
                        let _ = write!(s, " {:>w$}", c.layer.rank);
                    }
                    None => {
                        let _ = write!(s, " {:>w$}", "-");
                    }
                }
            }
            let _ = writeln!(s, " {:>6}", st.total);
        }
    }
    if let Some(o) = grid.other {
        let _ = writeln!(s, "\nlayers without a block number");
        for c in grid.cells.iter().filter(|c| c.row == o) {
            let _ = writeln!(s, "  {:>5}  {}", c.layer.rank, c.layer.name);
        }
    }
    let _ = writeln!(s);

    let unconverged: Vec<String> = report
        .layers
        .iter()
        .filter(|l| l.converged_step.is_none() && !l.degenerate)
        .map(|l| l.name.clone())
        .collect();
    list(&mut s, "not converged", &unconverged);
    let degenerate: Vec<String> = report
        .layers
        .iter()
        .filter(|l| l.degenerate)
        .map(|l| match l.relative_variance {
            Some(v) => format!(
                "{} (rank 0, input {}, relative variance {v:.1e})",
                l.name, l.input
            ),
            None => format!("{} (rank 0, input {})", l.name, l.input),
        })
        .collect();
    if !degenerate.is_empty() {
        list(&mut s, "no variance", &degenerate);
    }
    let uncertain: Vec<String> = report
        .layers
        .iter()
        .filter(|l| !l.allocation_certain)
        .map(|l| {
            format!(
                "{} (rank {}, {} error bound {:.2e})",
                l.name, l.rank, l.estimator, l.error_bound
            )
        })
        .collect();
    list(&mut s, "not certified", &uncertain);

    let t = &report.time_s;
    let _ = writeln!(
        s,
        "{:<15} total {:.2} s: forward {}, statistics {}, communication {}, leader {}; writing {:.2} s",
        "time",
        t.total,
        seconds(t.forward, t.total),
        seconds(t.statistics, t.total),
        seconds(t.communication, t.total),
        seconds(t.leader, t.total),
        t.writing
    );
    if report.world_size > 1 {
        let b = &report.bytes;
        let _ = writeln!(
            s,
            "{:<15} {} per rank in all, {} in the largest step, {} per step on average",
            "communicated",
            bytes(b.per_rank_total as f64),
            bytes(b.per_rank_max_step as f64),
            bytes(b.per_rank_mean_step)
        );
    }
    let missing: Vec<&str> = [SVG_FILE, CARD_FILE]
        .into_iter()
        .filter(|f| !dir.join(f).is_file())
        .collect();
    if missing.is_empty() {
        let _ = writeln!(s, "{:<15} {}", "picture", dir.join(SVG_FILE).display());
    } else {
        let _ = writeln!(
            s,
            "{:<15} no {} (written by an older eva; rerun eva init to get them)",
            "files",
            missing.join(" or ")
        );
    }
    s
}

/// Runs `eva report`.
pub fn run(args: &ReportArgs) -> Result<()> {
    let (raw, report) = load(&args.dir)?;
    let mut out = std::io::stdout().lock();
    let text = if args.json {
        raw
    } else {
        summary(&args.dir, &report).into_bytes()
    };
    out.write_all(&text)
        .and_then(|_| out.flush())
        .map_err(|e| Error::io("cannot write to", "stdout", e))
}
