//! The layers a run targets and how they group into unique inputs (equal-input groups: the
//! layers fed the same activation share one set of statistics), the experts' slices of 3-D
//! parameters (PEFT's `target_parameters`: one rank for all experts of a parameter), and PEFT's
//! target matching.

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
    /// Set when the layer is one expert's slice of a 3-D parameter.
    pub param: Option<Param>,
}

/// One expert's place in a 3-D expert parameter (`mlp.experts.gate_up_proj` `[E, 2f, h]`):
/// PEFT's `ParamWrapper` holds one `lora_A` of `r · experts` rows for it, expert `e`'s rows at
/// `e·r..(e+1)·r`, so every expert of a parameter has the same rank.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Param {
    /// The parameter's path, e.g. `model.layers.0.mlp.experts.gate_up_proj`.
    pub name: String,
    /// This layer's expert.
    pub expert: usize,
    /// Experts of the parameter.
    pub experts: usize,
}

impl Param {
    pub fn new(name: &str, expert: usize, experts: usize) -> Self {
        Param {
            name: name.to_string(),
            expert,
            experts,
        }
    }
}

impl LayerInfo {
    /// The name PEFT targets: the parameter's for an expert's slice, else the layer's own.
    pub fn target(&self) -> &str {
        self.param.as_ref().map_or(&self.name, |p| &p.name)
    }
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
                param: None,
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

    /// Tags layers as experts' slices of parameters (`params[i]` for layer `i`, `None` for a
    /// module). Every expert of a parameter must be present, in expert order.
    pub fn with_params(mut self, params: Vec<Option<Param>>) -> Self {
        assert_eq!(params.len(), self.layers.len(), "one tag per layer");
        for (l, p) in self.layers.iter_mut().zip(params) {
            l.param = p;
        }
        self
    }

    /// The layers of each 3-D parameter (catalog order of the parameters, expert order inside):
    /// the layers whose rank is one.
    pub fn params(&self) -> Vec<Vec<usize>> {
        let mut out: Vec<Vec<usize>> = Vec::new();
        let mut at = std::collections::HashMap::new();
        for (i, l) in self.layers.iter().enumerate() {
            if let Some(p) = &l.param {
                let k = *at.entry(p.name.as_str()).or_insert_with(|| {
                    out.push(Vec::new());
                    out.len() - 1
                });
                out[k].push(i);
            }
        }
        out
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
        let params = kept.iter().map(|&i| self.layers[i].param.clone()).collect();
        Catalog::new(layers, groups).with_params(params)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
