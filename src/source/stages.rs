//! Which pipeline stage holds what. A model is cut into contiguous runs of blocks balanced by
//! the memory a stage holds — its blocks' weights (the first stage also the input embeddings)
//! and its inputs' statistics — or as `--pp-split` says; every unique input then belongs to the
//! stage of its block. (Balancing the weights alone would give the first stage, which holds the
//! embeddings, fewer blocks and so far fewer statistics than the others: on a 12-block Llama
//! with a 32K vocabulary the last of two stages peaked at 1.7x the first.) Sources whose stages read
//! on their own (activation shards, synthetic data) cut the catalog's unique inputs, in catalog
//! order, into contiguous runs balanced by their statistics memory.

use crate::catalog::{matches_target, Catalog};
use crate::model::Model;
use crate::{Error, Result};
use std::ops::Range;

/// Cuts `costs` into `parts` contiguous non-empty runs whose largest total is as small as it can
/// be (linear partition by dynamic programming; among equal optima the earliest cuts win, so
/// the split is deterministic). Needs `1 <= parts <= costs.len()`.
pub fn balance(costs: &[u64], parts: usize) -> Vec<Range<usize>> {
    let n = costs.len();
    assert!(parts >= 1 && parts <= n, "{parts} parts of {n} items");
    let prefix: Vec<u64> = std::iter::once(0)
        .chain(costs.iter().scan(0u64, |s, &c| {
            *s += c;
            Some(*s)
        }))
        .collect();
    let sum = |a: usize, b: usize| prefix[b] - prefix[a];
    // best[k][i]: the smallest largest run when the first i items form k + 1 runs; cut[k][i]: where the last run starts.
    let mut best = vec![vec![u64::MAX; n + 1]; parts];
    let mut cut = vec![vec![0usize; n + 1]; parts];
    for (i, b) in best[0].iter_mut().enumerate().skip(1) {
        *b = sum(0, i);
    }
    for k in 1..parts {
        for i in (k + 1)..=n {
            for j in k..i {
                let v = best[k - 1][j].max(sum(j, i));
                if v < best[k][i] {
                    best[k][i] = v;
                    cut[k][i] = j;
                }
            }
        }
    }
    let mut runs = Vec::with_capacity(parts);
    let mut end = n;
    for k in (0..parts).rev() {
        let start = if k == 0 { 0 } else { cut[k][end] };
        runs.push(start..end);
        end = start;
    }
    runs.reverse();
    runs
}

/// Bytes of the embeddings and of each block as a stage holds them: weights as f32 (the CPU
/// backend decodes F16/BF16 once), plus `statistics(d)` for each unique input of the block that
/// `targets` keeps (all without targets). From the configuration alone: no shard is read.
pub fn block_memory(
    model: &Model,
    targets: Option<&[String]>,
    statistics: impl Fn(usize) -> u64,
) -> (u64, Vec<u64>) {
    let (embeddings, params) = model.parameters();
    let mut bytes: Vec<u64> = params.iter().map(|p| 4 * p).collect();
    let (catalog, points) = model.catalog();
    let kept = |g: usize| {
        targets.is_none_or(|t| {
            catalog.inputs[g]
                .members
                .iter()
                .any(|&m| matches_target(catalog.layers[m].target(), t))
        })
    };
    for (g, &(block, _)) in points.iter().enumerate() {
        if kept(g) {
            bytes[block] += statistics(catalog.inputs[g].dim);
        }
    }
    (4 * embeddings, bytes)
}

/// The blocks of each of `stages` stages: `split` (blocks per stage, as `--pp-split` gives them)
/// or, without one, contiguous runs balanced by `memory` = (embeddings, per block) bytes
/// ([`block_memory`]).
pub fn model_blocks(
    model: &Model,
    stages: usize,
    split: Option<&[usize]>,
    memory: (u64, Vec<u64>),
) -> Result<Vec<Range<usize>>> {
    let blocks = model.layers();
    if let Some(split) = split {
        let total: usize = split.iter().sum();
        if split.len() != stages || total != blocks || split.contains(&0) {
            return Err(Error::usage(format!(
                "--pp-split {} must give {stages} positive block counts (one per stage of --pp {stages}) adding up to the model's {blocks} blocks",
                split.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(",")
            )));
        }
        let mut start = 0;
        return Ok(split
            .iter()
            .map(|&b| {
                start += b;
                start - b..start
            })
            .collect());
    }
    if stages > blocks {
        return Err(Error::usage(format!(
            "--pp {stages} asks for more pipeline stages than the model's {blocks} blocks"
        )));
    }
    let (embeddings, mut costs) = memory;
    costs[0] += embeddings;
    Ok(balance(&costs, stages))
}

/// The stage of every unique input of `catalog`, from the block its representative layer is in.
pub fn owners_by_block(
    catalog: &Catalog,
    block_of: impl Fn(&str) -> Option<usize>,
    blocks: &[Range<usize>],
) -> Result<Vec<usize>> {
    catalog
        .inputs
        .iter()
        .map(|inp| {
            let name = &catalog.layers[inp.members[0]].name;
            let block = block_of(name)
                .ok_or_else(|| Error::data(format!("layer {name} is in no transformer block")))?;
            Ok(blocks
                .iter()
                .position(|r| r.contains(&block))
                .expect("the stages cover every block"))
        })
        .collect()
}

/// The stage of every unique input when stages read on their own: contiguous runs of inputs, in
/// catalog order, balanced by `memory(input)`.
pub fn owners_by_memory(
    catalog: &Catalog,
    memory: impl Fn(usize) -> u64,
    stages: usize,
) -> Result<Vec<usize>> {
    let n = catalog.inputs.len();
    if stages > n {
        return Err(Error::usage(format!("--pp {stages} asks for more pipeline stages than the {n} unique layer inputs to split among them")));
    }
    let costs: Vec<u64> = (0..n).map(memory).collect();
    let mut owner = vec![0; n];
    for (s, run) in balance(&costs, stages).into_iter().enumerate() {
        for g in run {
            owner[g] = s;
        }
    }
    Ok(owner)
}

/// A source opened for one stage of the grid, with the stage of every unique input and a
/// description of the cut: what the engine runs over (`engine::run`, `Engine::new`).
pub struct Staged {
    /// This stage's source.
    pub source: Box<dyn super::Source>,
    /// How the report names the source (`model:DIR data:FILE`, `activations:DIR`, ...).
    pub desc: String,
    /// Stage of each unique input (from [`owners_by_block`] or [`owners_by_memory`]).
    pub owner: Vec<usize>,
    /// How the stages were cut, one entry per stage (`blocks 0..6`, `inputs 0..3`), for the report.
    pub split: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balance_minimizes_the_largest_run() {
        assert_eq!(balance(&[1, 1, 1, 1], 2), vec![0..2, 2..4]);
        assert_eq!(balance(&[5, 1, 1, 1, 1, 1], 2), vec![0..1, 1..6]);
        assert_eq!(balance(&[3, 1, 1, 1, 1, 1, 1], 3), vec![0..1, 1..4, 4..7]);
        assert_eq!(balance(&[7], 1), vec![0..1]);
        // Every run is non-empty even when costs are zero.
        assert_eq!(balance(&[0, 0, 0], 3), vec![0..1, 1..2, 2..3]);
        for parts in 1..=6 {
            let costs = [4, 9, 2, 2, 7, 1];
            let runs = balance(&costs, parts);
            assert_eq!(runs.len(), parts);
            assert_eq!(runs.first().unwrap().start, 0);
            assert_eq!(runs.last().unwrap().end, 6);
            assert!(runs
                .windows(2)
                .all(|w| w[0].end == w[1].start && !w[0].is_empty()));
        }
    }
}
