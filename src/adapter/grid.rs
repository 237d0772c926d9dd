//! Layers placed on a blocks × module types grid, read from their names
//! (`model.layers.3.self_attn.q_proj` → block 3, type `q_proj`), for the picture, the model card
//! and `eva report`.

use super::report::{LayerReport, Report};

/// Row label of the layers whose names carry no block number.
pub const OTHER: &str = "other";

/// Where one layer sits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    /// Block number: the first all-digit component of the name; `None` when there is none.
    pub block: Option<usize>,
    /// The components after the block number (`self_attn.q_proj`); the whole name without one.
    pub suffix: String,
}

/// Splits a module path at its first all-digit component.
pub fn place(name: &str) -> Place {
    let parts: Vec<&str> = name.split('.').collect();
    match parts
        .iter()
        .position(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    {
        Some(i) if i + 1 < parts.len() => match parts[i].parse() {
            Ok(block) => Place {
                block: Some(block),
                suffix: parts[i + 1..].join("."),
            },
            Err(_) => Place {
                block: None,
                suffix: name.to_string(),
            },
        },
        _ => Place {
            block: None,
            suffix: name.to_string(),
        },
    }
}

/// Canonical order of the module types eva's models have; others follow in catalog order.
const KNOWN_ORDER: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "query",
    "key",
    "value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
];

/// One cell: the layer at (row, column).
#[derive(Clone, Debug)]
pub struct Cell<'a> {
    /// Index into [`Grid::rows`].
    pub row: usize,
    /// Index into [`Grid::columns`] (the `other` row counts its layers from 0).
    pub column: usize,
    pub layer: &'a LayerReport,
}

/// The report's layers on a grid: rows are module types, columns are blocks.
#[derive(Clone, Debug)]
pub struct Grid<'a> {
    /// Module type labels (short where unambiguous), then [`OTHER`] if any name has no block.
    pub rows: Vec<String>,
    /// Block numbers present, ascending.
    pub columns: Vec<usize>,
    /// Number of columns to draw: the blocks, or more if the `other` row is longer.
    pub width: usize,
    /// The row of the layers without a block number (the last), if any.
    pub other: Option<usize>,
    /// Every layer exactly once, catalog order.
    pub cells: Vec<Cell<'a>>,
}

impl<'a> Grid<'a> {
    /// Places every layer of `report`.
    pub fn new(report: &'a Report) -> Self {
        let places: Vec<Place> = report.layers.iter().map(|l| place(&l.name)).collect();
        // Short label = last component, unless two different suffixes share it
        // (BERT's `attention.output.dense` and `output.dense`).
        let mut suffixes: Vec<&str> = Vec::new();
        for p in places.iter().filter(|p| p.block.is_some()) {
            if !suffixes.contains(&p.suffix.as_str()) {
                suffixes.push(&p.suffix);
            }
        }
        let last = |s: &str| s.rsplit('.').next().unwrap_or(s).to_string();
        let label = |s: &str| {
            let short = last(s);
            if suffixes.iter().filter(|o| last(o) == short).count() > 1 {
                s.to_string()
            } else {
                short
            }
        };
        let rank_of = |l: &str| {
            KNOWN_ORDER
                .iter()
                .position(|k| *k == l)
                .unwrap_or(KNOWN_ORDER.len())
        };
        let mut rows: Vec<String> = Vec::new();
        for s in &suffixes {
            let l = label(s);
            if !rows.contains(&l) {
                rows.push(l);
            }
        }
        // Stable: known types in canonical order, the rest as first seen.
        rows.sort_by_key(|l| rank_of(l));
        let mut columns: Vec<usize> = places.iter().filter_map(|p| p.block).collect();
        columns.sort_unstable();
        columns.dedup();
        let other = places
            .iter()
            .any(|p| p.block.is_none())
            .then_some(rows.len());
        if other.is_some() {
            rows.push(OTHER.to_string());
        }
        let mut cells = Vec::with_capacity(report.layers.len());
        let mut others = 0;
        for (layer, p) in report.layers.iter().zip(&places) {
            let (row, column) = match p.block {
                Some(b) => {
                    let l = label(&p.suffix);
                    (
                        rows.iter()
                            .position(|r| *r == l)
                            .expect("every suffix has a row"),
                        columns.binary_search(&b).expect("every block has a column"),
                    )
                }
                None => {
                    others += 1;
                    (rows.len() - 1, others - 1)
                }
            };
            cells.push(Cell { row, column, layer });
        }
        let width = columns.len().max(others);
        Grid {
            rows,
            columns,
            width,
            other,
            cells,
        }
    }

    /// The cell at (row, column), if a layer sits there.
    pub fn at(&self, row: usize, column: usize) -> Option<&Cell<'a>> {
        self.cells
            .iter()
            .find(|c| c.row == row && c.column == column)
    }
}

/// Fraction of its input's variance a layer keeps: the sum of its first `rank` ratios.
pub fn captured(layer: &LayerReport) -> f64 {
    layer.explained_variance_ratio.iter().take(layer.rank).sum()
}

/// Rank totals over a set of layers.
#[derive(Clone, Debug, PartialEq)]
pub struct RankStats {
    pub layers: usize,
    /// Layers with rank 0 (left out of the adapter).
    pub dropped: usize,
    pub total: usize,
    pub min: usize,
    pub max: usize,
}

impl RankStats {
    /// Totals of `ranks` (all zero when empty).
    pub fn of(ranks: impl IntoIterator<Item = usize>) -> Self {
        let ranks: Vec<usize> = ranks.into_iter().collect();
        RankStats {
            layers: ranks.len(),
            dropped: ranks.iter().filter(|&&r| r == 0).count(),
            total: ranks.iter().sum(),
            min: ranks.iter().copied().min().unwrap_or(0),
            max: ranks.iter().copied().max().unwrap_or(0),
        }
    }

    /// Mean rank per layer.
    pub fn mean(&self) -> f64 {
        if self.layers == 0 {
            0.0
        } else {
            self.total as f64 / self.layers as f64
        }
    }
}

impl Grid<'_> {
    /// Rank totals per row (module type), in row order.
    pub fn by_type(&self) -> Vec<(String, RankStats)> {
        (0..self.rows.len())
            .map(|r| {
                (
                    self.rows[r].clone(),
                    RankStats::of(
                        self.cells
                            .iter()
                            .filter(|c| c.row == r)
                            .map(|c| c.layer.rank),
                    ),
                )
            })
            .collect()
    }

    /// Rank totals per block, in column order (layers without a block are not counted).
    pub fn by_block(&self) -> Vec<(usize, RankStats)> {
        self.columns
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                let ranks = self
                    .cells
                    .iter()
                    .filter(|c| c.column == i && Some(c.row) != self.other)
                    .map(|c| c.layer.rank);
                (b, RankStats::of(ranks))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_at_the_block_number() {
        assert_eq!(
            place("model.layers.3.self_attn.q_proj"),
            Place {
                block: Some(3),
                suffix: "self_attn.q_proj".into()
            }
        );
        assert_eq!(
            place("encoder.layer.2.attention.self.query"),
            Place {
                block: Some(2),
                suffix: "attention.self.query".into()
            }
        );
        assert_eq!(
            place("model.layers.12.proj0"),
            Place {
                block: Some(12),
                suffix: "proj0".into()
            }
        );
        assert_eq!(
            place("model.a.iso"),
            Place {
                block: None,
                suffix: "model.a.iso".into()
            }
        );
        // A trailing number is not a block (nothing after it names the module).
        assert_eq!(
            place("model.h.7"),
            Place {
                block: None,
                suffix: "model.h.7".into()
            }
        );
    }
}
