//! Where layer inputs come from. A source numbers its units (activation files, sequences,
//! synthetic batches) in a fixed order and hands the rows of each unique layer input to a sink.
//!
//! | source | unit |
//! |---|---|
//! | [`model::ModelSource`] | one example (line) of `--data FILE`, run through `--model DIR` |
//! | [`shards::ShardSource`] | one `*.safetensors` file of `--activations DIR` |
//! | [`synthetic::SyntheticSource`] | one generated batch of `--synthetic SPEC` |

pub mod model;
pub mod shards;
pub mod stages;
pub mod synthetic;

use crate::catalog::{matches_target, Catalog};
use crate::device::cuda::Cuda;
use crate::device::rows::{Hidden, Rows};
use crate::{Error, Result};

/// Receives the rows of unique input `input` for the units being read.
pub type Sink<'a> = dyn FnMut(usize, Rows<'_>) -> Result<()> + 'a;

/// A numbered sequence of units of layer inputs.
pub trait Source {
    /// The layers and unique inputs this source provides.
    fn catalog(&self) -> &Catalog;
    /// Number of units.
    fn units(&self) -> usize;
    /// Visits the rows of every input with `wanted[input]` for the units in `units`, in order.
    /// The units of one call form a *pass*, which a source may compute together (the model
    /// source runs them as one forward pass) and hand over as one block of rows.
    fn read(&mut self, units: &[usize], wanted: &[bool], sink: &mut Sink<'_>) -> Result<()>;
    /// [`Source::read`] as one stage of a pipeline: `input` is the hidden state the previous
    /// stage returned for this pass (`None` on the first stage), and with `output` the stage
    /// returns its own for the next. Sources whose stages read on their own (shards, synthetic
    /// data: [`Source::pipelined`] is false) just read.
    fn read_stage(
        &mut self,
        units: &[usize],
        wanted: &[bool],
        input: Option<Hidden>,
        output: bool,
        sink: &mut Sink<'_>,
    ) -> Result<Option<Hidden>> {
        let _ = (input, output);
        self.read(units, wanted, sink).map(|_| None)
    }
    /// Whether a stage's inputs are computed from the previous stage's output (a model's
    /// blocks), so that passes flow stage to stage.
    fn pipelined(&self) -> bool {
        false
    }
    /// Consecutive units of a step the engine hands to one [`Source::read`] call (see
    /// [`crate::engine::passes_of_step`]): the grouping depends on this and the batch size only,
    /// never on the world size, so every rank computes a pass bit for bit the same.
    fn pass_units(&self) -> usize {
        1
    }
    /// The GPU whose memory the rows of [`Rows::Device`] live in (`--device cuda`), so that the
    /// statistics are kept there too; `None` for sources that deliver host rows.
    fn device(&self) -> Option<std::sync::Arc<Cuda>> {
        None
    }

    /// The most rows one unit can give any input, when that is known before any unit is read
    /// (synthetic data: its `tokens`; a model: the longest sequence it keeps); `None` when it is
    /// not. The CLI's fail-fast token check (`cli/tokens.rs`) bounds a run's tokens with it.
    fn max_unit_tokens(&self) -> Option<usize> {
        None
    }
}

/// Orders module paths so that numbered parts compare as numbers (`layers.2` < `layers.10`).
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (pa, pb) = (parts(a), parts(b));
    for ((da, sa), (db, sb)) in pa.iter().zip(&pb) {
        let ord = if *da && *db {
            let (ta, tb) = (sa.trim_start_matches('0'), sb.trim_start_matches('0'));
            ta.len().cmp(&tb.len()).then(ta.cmp(tb))
        } else {
            sa.cmp(sb)
        };
        if ord.is_ne() {
            return ord;
        }
    }
    pa.len().cmp(&pb.len()).then(a.cmp(b))
}

/// A source restricted to the layers that `--targets` selects.
pub struct Targeted {
    inner: Box<dyn Source>,
    catalog: Catalog,
    /// Inner input index of each of our inputs.
    to_inner: Vec<usize>,
    /// Our input index of each inner input, if kept.
    from_inner: Vec<Option<usize>>,
}

impl Targeted {
    /// Keeps the layers matching `targets`; an entry that matches nothing is an error that lists
    /// the available layer names.
    pub fn new(inner: Box<dyn Source>, targets: &[String]) -> Result<Self> {
        let all = inner.catalog();
        for t in targets {
            if !all
                .layers
                .iter()
                .any(|l| matches_target(l.target(), std::slice::from_ref(t)))
            {
                let mut names: Vec<&str> = all.layers.iter().map(|l| l.target()).collect();
                names.dedup();
                return Err(Error::usage(format!(
                    "--targets entry `{t}` matches no layer; available layers: {}",
                    names.join(", ")
                )));
            }
        }
        let catalog = all.retain(|l| matches_target(l.target(), targets));
        let to_inner: Vec<usize> = catalog
            .inputs
            .iter()
            .map(|inp| {
                let name = &catalog.layers[inp.members[0]].name;
                all.layers
                    .iter()
                    .find(|l| &l.name == name)
                    .expect("retained from this catalog")
                    .input
            })
            .collect();
        let mut from_inner = vec![None; all.inputs.len()];
        for (ours, &theirs) in to_inner.iter().enumerate() {
            from_inner[theirs] = Some(ours);
        }
        Ok(Targeted {
            inner,
            catalog,
            to_inner,
            from_inner,
        })
    }
}

impl Source for Targeted {
    fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    fn units(&self) -> usize {
        self.inner.units()
    }

    fn pass_units(&self) -> usize {
        self.inner.pass_units()
    }

    fn max_unit_tokens(&self) -> Option<usize> {
        self.inner.max_unit_tokens()
    }

    fn pipelined(&self) -> bool {
        self.inner.pipelined()
    }

    fn device(&self) -> Option<std::sync::Arc<Cuda>> {
        self.inner.device()
    }

    fn read(&mut self, units: &[usize], wanted: &[bool], sink: &mut Sink<'_>) -> Result<()> {
        self.read_stage(units, wanted, None, false, sink)
            .map(|_| ())
    }

    fn read_stage(
        &mut self,
        units: &[usize],
        wanted: &[bool],
        input: Option<Hidden>,
        output: bool,
        sink: &mut Sink<'_>,
    ) -> Result<Option<Hidden>> {
        let mut inner_wanted = vec![false; self.from_inner.len()];
        for (ours, &theirs) in self.to_inner.iter().enumerate() {
            inner_wanted[theirs] = wanted[ours];
        }
        let from_inner = &self.from_inner;
        self.inner.read_stage(
            units,
            &inner_wanted,
            input,
            output,
            &mut |g, x| match from_inner[g] {
                Some(ours) => sink(ours, x),
                None => Ok(()),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_compares_numbers() {
        let mut v = vec!["layers.10.q", "layers.2.q", "layers.2.k", "a"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["a", "layers.2.k", "layers.2.q", "layers.10.q"]);
    }
}
