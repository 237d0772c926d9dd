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

use crate::model::cuda::{Cuda, CudaTensor};
use crate::model::ops::Backend;
use crate::{Error, Result};
use ndarray::{ArrayView2, CowArray, Ix2};
use std::sync::Arc;

/// One targeted linear layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerInfo {
    /// Module path, e.g. `model.layers.3.self_attn.q_proj`.
    pub name: String,
    /// Input features (`d` of its statistics).
    pub in_features: usize,
    /// Output features (rows of `lora_B`).
    pub out_features: usize,
    /// Index of the unique input (equal-input group) this layer reads.
    pub input: usize,
}

/// One unique layer input, shared by an equal-input group of layers.
#[derive(Clone, Debug, PartialEq)]
pub struct InputInfo {
    /// Feature dimension.
    pub dim: usize,
    /// Layers fed this input, in catalog order; the first is the group's representative.
    pub members: Vec<usize>,
}

/// The layers a source provides and how they group into unique inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct Catalog {
    /// Target layers in a fixed order.
    pub layers: Vec<LayerInfo>,
    /// Unique inputs; `layers[i].input` indexes this.
    pub inputs: Vec<InputInfo>,
}

impl Catalog {
    /// Builds a catalog from `(name, in_features, out_features)` and groups of layer indices
    /// that share one input (every layer in exactly one group).
    pub fn new(layers: Vec<(String, usize, usize)>, groups: Vec<Vec<usize>>) -> Self {
        let mut infos: Vec<LayerInfo> = layers
            .into_iter()
            .map(|(name, in_features, out_features)| LayerInfo {
                name,
                in_features,
                out_features,
                input: 0,
            })
            .collect();
        let mut groups = groups;
        for g in &mut groups {
            g.sort_unstable();
        }
        groups.sort_by_key(|g| g[0]);
        let inputs = groups
            .into_iter()
            .enumerate()
            .map(|(i, members)| {
                for &m in &members {
                    infos[m].input = i;
                }
                InputInfo {
                    dim: infos[members[0]].in_features,
                    members,
                }
            })
            .collect();
        Catalog {
            layers: infos,
            inputs,
        }
    }

    /// The index of input `g`'s representative layer (its group's first member).
    pub fn representative(&self, g: usize) -> usize {
        self.inputs[g].members[0]
    }

    /// Keeps only the layers `keep` selects, renumbering inputs; inputs left without layers go.
    pub fn retain(&self, keep: impl Fn(&LayerInfo) -> bool) -> Catalog {
        let kept: Vec<usize> = (0..self.layers.len())
            .filter(|&i| keep(&self.layers[i]))
            .collect();
        let mut index = vec![usize::MAX; self.layers.len()];
        for (new, &old) in kept.iter().enumerate() {
            index[old] = new;
        }
        let layers = kept
            .iter()
            .map(|&i| {
                (
                    self.layers[i].name.clone(),
                    self.layers[i].in_features,
                    self.layers[i].out_features,
                )
            })
            .collect();
        let groups = self
            .inputs
            .iter()
            .map(|inp| {
                inp.members
                    .iter()
                    .filter(|&&m| index[m] != usize::MAX)
                    .map(|&m| index[m])
                    .collect::<Vec<_>>()
            })
            .filter(|g| !g.is_empty())
            .collect();
        Catalog::new(layers, groups)
    }
}

/// The captured rows (`tokens x dim`, f32) of one unique input: a host matrix, or a buffer on
/// the GPU that ran the forward pass (`--device cuda`), which the device statistics take as it is.
#[derive(Clone, Copy)]
pub enum Rows<'a> {
    /// Rows in host memory (the CPU forward pass, activation files, synthetic data).
    Host(ArrayView2<'a, f32>),
    /// Rows on `gpu` (row-major `[tokens, dim]`).
    Device { gpu: &'a Cuda, x: &'a CudaTensor },
}

impl<'a> Rows<'a> {
    /// Token rows.
    pub fn nrows(&self) -> usize {
        match self {
            Rows::Host(x) => x.nrows(),
            Rows::Device { gpu, x } => gpu.tokens(x),
        }
    }

    /// Features.
    pub fn ncols(&self) -> usize {
        match self {
            Rows::Host(x) => x.ncols(),
            Rows::Device { gpu, x } => gpu.dim(x),
        }
    }

    /// The rows in host memory: a view of host rows, a copy of device rows.
    pub fn to_host(&self) -> Result<CowArray<'a, f32, Ix2>> {
        match *self {
            Rows::Host(x) => Ok(CowArray::from(x)),
            Rows::Device { gpu, x } => Ok(CowArray::from(gpu.to_host(x)?)),
        }
    }

    /// [`check_finite`] wherever the rows are (on a GPU, one flag comes back; the rows only when
    /// it is set, to name the token and feature).
    pub fn check_finite(&self, context: impl FnOnce() -> String) -> Result<()> {
        match *self {
            Rows::Host(x) => check_finite(x, context),
            Rows::Device { gpu, x } => {
                if gpu.all_finite(x)? {
                    return Ok(());
                }
                let what = context();
                check_finite(self.to_host()?.view(), || what.clone())?;
                Err(Error::data(format!(
                    "{what}: non-finite activation (seen on the GPU, not in the copy on the host)"
                )))
            }
        }
    }
}

/// Receives the rows of unique input `input` for the units being read.
pub type Sink<'a> = dyn FnMut(usize, Rows<'_>) -> Result<()> + 'a;

/// What one pipeline stage hands the next for a pass: the hidden state after its last block
/// (`tokens x hidden`, f32), where the stage computed it, so that `--device cuda` stages pass it
/// GPU to GPU ([`crate::engine::protocol::Wire::send_hidden`]).
pub enum Hidden {
    /// In host memory (the CPU forward pass).
    Host(ndarray::Array2<f32>),
    /// On `gpu`, the GPU that ran the stage's forward pass (`--device cuda`).
    Device { gpu: Arc<Cuda>, x: CudaTensor },
}

impl Hidden {
    /// The hidden state in host memory (a copy of one on a GPU).
    pub fn into_host(self) -> Result<ndarray::Array2<f32>> {
        match self {
            Hidden::Host(h) => Ok(h),
            Hidden::Device { gpu, x } => gpu.to_host(&x),
        }
    }

    /// The hidden state on `gpu` (an upload of one in host memory).
    pub fn into_device(self, gpu: &Cuda) -> Result<CudaTensor> {
        match self {
            Hidden::Host(h) => gpu.from_host(&h),
            Hidden::Device { x, .. } => Ok(x),
        }
    }
}

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

/// Fails on the first NaN or infinity in `rows`, naming where it came from.
pub fn check_finite(rows: ArrayView2<f32>, context: impl FnOnce() -> String) -> Result<()> {
    // Fast path: an OR over exponent bits (all ones = NaN or infinity) vectorizes.
    let nonfinite = |v: &f32| ((v.to_bits() & 0x7f80_0000) == 0x7f80_0000) as u32;
    let any = match rows.as_slice() {
        Some(s) => s.iter().fold(0, |a, v| a | nonfinite(v)),
        None => rows.iter().fold(0, |a, v| a | nonfinite(v)),
    };
    if any == 0 {
        return Ok(());
    }
    if let Some((pos, v)) = rows.indexed_iter().find(|(_, v)| !v.is_finite()) {
        return Err(Error::data(format!(
            "{}: non-finite activation {v} at token {}, feature {}",
            context(),
            pos.0,
            pos.1
        )));
    }
    Ok(())
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

/// PEFT `target_modules` matching: the name equals an entry or ends with `.` + entry.
pub fn matches_target(name: &str, targets: &[String]) -> bool {
    targets.iter().any(|t| {
        name == t
            || (name.len() > t.len()
                && name.ends_with(t.as_str())
                && name.as_bytes()[name.len() - t.len() - 1] == b'.')
    })
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
                .any(|l| matches_target(&l.name, std::slice::from_ref(t)))
            {
                let names: Vec<&str> = all.layers.iter().map(|l| l.name.as_str()).collect();
                return Err(Error::usage(format!(
                    "--targets entry `{t}` matches no layer; available layers: {}",
                    names.join(", ")
                )));
            }
        }
        let catalog = all.retain(|l| matches_target(&l.name, targets));
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

    #[test]
    fn target_matching_is_peft_suffix_matching() {
        let t = vec!["q_proj".to_string(), "layers.1.mlp".to_string()];
        assert!(matches_target("model.layers.0.self_attn.q_proj", &t));
        assert!(matches_target("q_proj", &t));
        assert!(!matches_target("model.layers.0.self_attn.xq_proj", &t));
        assert!(matches_target("model.layers.1.mlp", &t));
        assert!(!matches_target("model.layers.11.mlp", &t));
    }

    #[test]
    fn retain_renumbers_inputs() {
        let c = Catalog::new(
            vec![("a".into(), 4, 4), ("b".into(), 4, 4), ("c".into(), 8, 2)],
            vec![vec![0, 1], vec![2]],
        );
        let r = c.retain(|l| l.name != "a");
        assert_eq!(r.layers.len(), 2);
        assert_eq!(r.inputs.len(), 2);
        assert_eq!(r.inputs[0].members, vec![0]);
        assert_eq!(r.layers[1].input, 1);
    }
}
