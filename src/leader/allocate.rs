//! PEFT's global rank redistribution (`_get_rank_distribution` in `peft/tuners/lora/eva.py`):
//! every target layer offers its input's first `cap_l` explained-variance ratios ([`caps`]); the
//! global top `budget = Σ r_l` ([`budget`]) are kept and each layer's rank is its count, `r_l`
//! being the layer's rank before redistribution (`r`, or its `rank_pattern` entry).
//!
//! Ties (equal ratios, e.g. inside a group) are broken deterministically: a group's
//! representative first, then layer order, then component index — so the representative holds
//! the largest rank of its group, as PEFT's swap step ensures. Members of a group therefore get
//! the same rank except where the budget's cut falls inside the group's tied candidates, exactly
//! where PEFT's own allocation splits it (by one component).
//!
//! Experts' slices of a 3-D parameter (PEFT's `target_parameters`, [`Catalog::params`]) share one
//! rank, since PEFT's `ParamWrapper` holds `r` rows per expert: the parameter offers its slots
//! `j < cap` as one candidate each, worth the mean over its experts (those with a spectrum) of
//! their `j`-th ratio and costing one component per expert. The budget counts every expert
//! (`E · r` for a parameter of `E` experts at rank `r`), so rank moves between a parameter and
//! the other layers `E` components at a time, at the per-expert ratio. A candidate that costs more
//! than the budget left is passed over for the next; with no parameters this is PEFT's cut.
//!
//! Only finite, positive ratios are offered ([`offered`]): a NaN, an infinity or a component that
//! explains no variance (a degenerate input's ratios are all 0, see
//! [`super::Summary::is_degenerate`]) never takes budget, so a degenerate input's whole group gets
//! rank 0.

use crate::catalog::Catalog;
use crate::config::EvaParams;

/// Candidate components per layer (catalog order), PEFT's `max_components`: `round(r_l × rho)`,
/// the largest of its equal-input group for every member (they share one spectrum), and never
/// more than `in_features`.
pub fn caps(catalog: &Catalog, params: &EvaParams) -> Vec<usize> {
    let own: Vec<usize> = catalog
        .layers
        .iter()
        .map(|l| params.components(params.layer_rank(l.target())))
        .collect();
    catalog
        .layers
        .iter()
        .map(|l| {
            let group = &catalog.inputs[l.input].members;
            group
                .iter()
                .map(|&m| own[m])
                .max()
                .unwrap_or(0)
                .min(l.in_features)
        })
        .collect()
}

/// Candidate components of unique input `input` from the per-layer [`caps`]: the cap its layers
/// share.
pub fn input_cap(catalog: &Catalog, caps: &[usize], input: usize) -> usize {
    caps[catalog.representative(input)]
}

/// The rank budget: the sum of the layers' ranks before redistribution.
pub fn budget(catalog: &Catalog, params: &EvaParams) -> usize {
    catalog
        .layers
        .iter()
        .map(|l| params.layer_rank(l.target()))
        .sum()
}

/// Whether a ratio may take budget: finite and positive (NaN, infinities and components that
/// explain no variance never do).
pub fn offered(ratio: f64) -> bool {
    ratio.is_finite() && ratio > 0.0
}

/// Rank per layer (catalog order) from per-input ratios (`ratios[input]`, descending) and
/// per-layer [`caps`]. Only [`offered`] ratios compete: an input without variance (all its
/// ratios 0) gives every member of its group rank 0. A parameter's experts take one rank
/// together (see the module's documentation).
pub fn redistribute(
    catalog: &Catalog,
    ratios: &[Vec<f64>],
    caps: &[usize],
    budget: usize,
) -> Vec<usize> {
    let params = catalog.params();
    // (ratio, not the representative, first layer, component, the layers that take it).
    let mut candidates: Vec<(f64, bool, usize, usize, &[usize])> = Vec::new();
    let singles: Vec<[usize; 1]> = (0..catalog.layers.len()).map(|l| [l]).collect();
    for (l, layer) in catalog.layers.iter().enumerate() {
        if layer.param.is_some() {
            continue;
        }
        let rep = catalog.representative(layer.input) == l;
        for (j, ratio) in offers(&ratios[layer.input], caps[l]) {
            candidates.push((ratio, !rep, l, j, &singles[l]));
        }
    }
    for members in &params {
        for (j, ratio) in param_offers(catalog, ratios, caps[members[0]], members) {
            candidates.push((ratio, false, members[0], j, members));
        }
    }
    candidates.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    let mut ranks = vec![0; catalog.layers.len()];
    let mut left = budget;
    for &(_, _, _, _, takers) in &candidates {
        if left == 0 {
            break;
        }
        if takers.len() <= left {
            left -= takers.len();
            for &l in takers {
                ranks[l] += 1;
            }
        }
    }
    ranks
}

/// A parameter's offered slots: slot `j`'s ratio is the mean of the `j`-th ratios of its experts
/// that offer any (an expert without a spectrum, or a degenerate one, follows the others); the
/// slots end at the first one that is not [`offered`].
fn param_offers(
    catalog: &Catalog,
    ratios: &[Vec<f64>],
    cap: usize,
    members: &[usize],
) -> Vec<(usize, f64)> {
    let live: Vec<&Vec<f64>> = members
        .iter()
        .map(|&m| &ratios[catalog.layers[m].input])
        .filter(|r| r.first().is_some_and(|&x| offered(x)))
        .collect();
    if live.is_empty() {
        return Vec::new();
    }
    (0..cap)
        .map(|j| {
            let sum: f64 = live
                .iter()
                .map(|r| r.get(j).copied().filter(|&x| offered(x)).unwrap_or(0.0))
                .sum();
            (j, sum / live.len() as f64)
        })
        .take_while(|&(_, r)| offered(r))
        .collect()
}

/// The first `cap` ratios of an input that may take budget, with their component index
/// (ratios are descending: the first one that is not [`offered`] ends them).
fn offers(ratios: &[f64], cap: usize) -> impl Iterator<Item = (usize, f64)> + '_ {
    ratios
        .iter()
        .take(cap)
        .take_while(|&&r| offered(r))
        .copied()
        .enumerate()
}

/// Whether each layer's rank would be the same for every spectrum the error bounds allow: the
/// true ratio of component `i` of input `g` lies in `[ratios[g][i], ratios[g][i] + bounds[g]]`.
/// Exact statistics (`bounds = 0`) are always certain. An expert's slice of a parameter is
/// certain when its statistics are exact (its rank follows its parameter's mean ratios).
pub fn certain(
    catalog: &Catalog,
    ratios: &[Vec<f64>],
    bounds: &[f64],
    ranks: &[usize],
    caps: &[usize],
) -> Vec<bool> {
    let (mut kept_min, mut dropped_max) = (f64::INFINITY, f64::NEG_INFINITY);
    let offered = |l: usize| {
        let g = catalog.layers[l].input;
        offers(&ratios[g], caps[l]).map(move |(j, r)| (j, r, r + bounds[g]))
    };
    let single = |l: &usize| catalog.layers[*l].param.is_none();
    for (l, &rank) in ranks.iter().enumerate().filter(|(l, _)| single(l)) {
        for (j, lo, hi) in offered(l) {
            if j < rank {
                kept_min = kept_min.min(lo);
            } else {
                dropped_max = dropped_max.max(hi);
            }
        }
    }
    (0..catalog.layers.len())
        .map(|l| {
            if !single(&l) {
                return bounds[catalog.layers[l].input] == 0.0;
            }
            offered(l).all(|(j, lo, hi)| {
                if j < ranks[l] {
                    lo >= dropped_max
                } else {
                    hi <= kept_min
                }
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog(dims: &[usize], groups: Vec<Vec<usize>>) -> Catalog {
        Catalog::new(
            dims.iter()
                .enumerate()
                .map(|(i, &d)| (format!("l{i}"), d, d))
                .collect(),
            groups,
        )
    }

    /// The same cap for every layer, never more than its `in_features`.
    fn cap(c: &Catalog, cap: usize) -> Vec<usize> {
        c.layers.iter().map(|l| cap.min(l.in_features)).collect()
    }

    #[test]
    fn rank_pattern_sets_caps_budget_and_the_groups_largest_cap() {
        // Layers 0,1 share an input (like q/k); 2 and 3 are alone, 3 with in_features 3.
        let c = Catalog::new(
            vec![
                ("m.0.q".into(), 8, 8),
                ("m.0.k".into(), 8, 8),
                ("m.0.o".into(), 8, 8),
                ("m.0.down".into(), 3, 8),
            ],
            vec![vec![0, 1], vec![2], vec![3]],
        );
        let params = EvaParams {
            rank: 2,
            rank_pattern: vec![("k".into(), 3), ("o".into(), 1)],
            rho: 1.5,
            ..EvaParams::default()
        };
        // round(2·1.5) = 3, round(3·1.5) = 4 (half to even), round(1·1.5) = 2, 3 capped by d = 3.
        assert_eq!(caps(&c, &params), vec![4, 4, 2, 3]);
        assert_eq!(budget(&c, &params), 2 + 3 + 1 + 2);
        // With rho = 1 a layer alone keeps its own rank whatever the spectra; a group offers its
        // largest cap from each member, and its representative (q) takes the larger share, as
        // PEFT's swap step ensures: q asked for 2 and k for 3, they get 3 and 2.
        let rho1 = EvaParams { rho: 1.0, ..params };
        let ratios = vec![vec![0.9, 0.05, 0.03], vec![0.5, 0.4], vec![0.6, 0.3, 0.1]];
        let caps1 = caps(&c, &rho1);
        assert_eq!(caps1, vec![3, 3, 1, 2]);
        let ranks = redistribute(&c, &ratios, &caps1, budget(&c, &rho1));
        assert_eq!(ranks, vec![3, 2, 1, 2]);
    }

    #[test]
    fn budget_goes_to_the_largest_ratios() {
        let c = catalog(&[8, 8, 8], vec![vec![0], vec![1], vec![2]]);
        let ratios = vec![
            vec![0.5, 0.3, 0.1, 0.05],
            vec![0.9, 0.05, 0.01, 0.0],
            vec![0.2, 0.19, 0.18, 0.17],
        ];
        // r = 2, rho = 2: cap 4, budget 6.
        let ranks = redistribute(&c, &ratios, &cap(&c, 4), 6);
        assert_eq!(ranks, vec![2, 1, 3]);
        assert_eq!(ranks.iter().sum::<usize>(), 6);
    }

    #[test]
    fn rho_one_keeps_every_rank() {
        let c = catalog(&[8, 8], vec![vec![0], vec![1]]);
        let ratios = vec![vec![0.9, 0.05], vec![0.01, 0.001]];
        assert_eq!(redistribute(&c, &ratios, &cap(&c, 2), 4), vec![2, 2]);
    }

    #[test]
    fn rank_zero_and_cap_by_dimension() {
        let c = catalog(&[8, 2], vec![vec![0], vec![1]]);
        let ratios = vec![vec![0.6, 0.3, 0.05, 0.01], vec![0.001, 0.0005]];
        assert_eq!(redistribute(&c, &ratios, &cap(&c, 4), 4), vec![4, 0]);
        // The second layer may never exceed its in_features, and components that explain no
        // variance are not offered: one unit of the budget stays unused.
        let ratios = vec![vec![0.01, 0.0, 0.0, 0.0], vec![0.9, 0.5]];
        assert_eq!(redistribute(&c, &ratios, &cap(&c, 4), 4), vec![1, 2]);
    }

    #[test]
    fn groups_share_ratios_and_the_representative_wins_ties() {
        // Layers 0,1,2 share input 0 (like q/k/v); layer 3 is alone.
        let c = catalog(&[8, 8, 8, 8], vec![vec![0, 1, 2], vec![3]]);
        let ratios = vec![vec![0.4, 0.2, 0.1, 0.05], vec![0.3, 0.15, 0.02, 0.01]];
        // Sorted: 0.4 x3 (group), 0.3, 0.2 x3 (group), 0.15 ...; a budget of 6 cuts inside the
        // tied 0.2s, and the later group member loses, as in PEFT.
        let ranks = redistribute(&c, &ratios, &cap(&c, 4), 6);
        assert_eq!(ranks, vec![2, 2, 1, 1]);
        assert!(ranks[0] >= ranks[1] && ranks[1] >= ranks[2]);
        // A budget of 7 fits the group's second component for every member.
        assert_eq!(redistribute(&c, &ratios, &cap(&c, 4), 7), vec![2, 2, 2, 1]);
    }

    #[test]
    fn a_group_without_variance_gets_rank_zero_for_every_member() {
        // Members listed apart in catalog order (k, o, q, v): an input without variance (all
        // ratios 0: the --max-seq-len 1 probe) gets nothing for any member, never a component
        // of its null space, whatever budget is left over.
        let c = catalog(&[8, 8, 8, 8], vec![vec![0, 2, 3], vec![1]]);
        let ratios = vec![vec![0.0; 4], vec![0.3, 0.15, 0.02, 0.01]];
        assert_eq!(redistribute(&c, &ratios, &cap(&c, 4), 16), vec![0, 4, 0, 0]);
        let sure = certain(&c, &ratios, &[0.0, 0.0], &[0, 4, 0, 0], &cap(&c, 4));
        assert_eq!(sure, vec![true; 4]);
    }

    #[test]
    fn nan_and_infinite_ratios_never_reach_the_allocation() {
        let c = catalog(&[8, 8, 8], vec![vec![0], vec![1], vec![2]]);
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1e-17] {
            // A NaN sorts above every number under `total_cmp`: it would take the whole cap.
            let ratios = vec![
                vec![bad; 4],
                vec![0.5, 0.2, 0.1, 0.05],
                vec![0.3, 0.1, 0.0, 0.0],
            ];
            let ranks = redistribute(&c, &ratios, &cap(&c, 4), 6);
            assert_eq!(ranks, vec![0, 4, 2], "{bad}");
            let sure = certain(&c, &ratios, &[0.0; 3], &ranks, &cap(&c, 4));
            assert_eq!(sure, vec![true; 3], "{bad}");
            // A bad ratio after good ones ends what the input offers.
            let ratios = vec![
                vec![0.6, bad, 0.5, 0.4],
                vec![0.5, 0.2, 0.1, 0.05],
                vec![0.3; 4],
            ];
            let ranks = redistribute(&c, &ratios, &cap(&c, 4), 6);
            assert_eq!(ranks, vec![1, 1, 4], "{bad}");
        }
    }

    #[test]
    fn certainty_follows_the_bounds() {
        let c = catalog(&[8, 8], vec![vec![0], vec![1]]);
        let ratios = vec![vec![0.5, 0.2], vec![0.19, 0.01]];
        let ranks = redistribute(&c, &ratios, &cap(&c, 2), 2);
        assert_eq!(ranks, vec![2, 0]);
        assert_eq!(
            certain(&c, &ratios, &[0.0, 0.0], &ranks, &cap(&c, 2)),
            vec![true, true]
        );
        // If input 1's ratios may be 0.02 higher, its 0.19 could beat input 0's 0.2.
        assert_eq!(
            certain(&c, &ratios, &[0.0, 0.02], &ranks, &cap(&c, 2)),
            vec![false, false]
        );
    }

    #[test]
    fn exact_ties_break_by_layer_order() {
        let c = catalog(&[4, 4], vec![vec![0], vec![1]]);
        let ratios = vec![vec![0.25; 4], vec![0.25; 4]];
        assert_eq!(redistribute(&c, &ratios, &cap(&c, 4), 5), vec![4, 1]);
    }

    #[test]
    fn a_parameters_experts_take_one_rank_at_their_mean_ratio() {
        use crate::catalog::Param;
        // A dense layer (input 0) and a parameter of two experts (inputs 1 and 2).
        let c = catalog(&[8, 8, 8], vec![vec![0], vec![1], vec![2]]).with_params(vec![
            None,
            Some(Param::new("p", 0, 2)),
            Some(Param::new("p", 1, 2)),
        ]);
        let caps = vec![4; 3];
        let ratios = vec![
            vec![0.5, 0.2, 0.05, 0.01],
            vec![0.6, 0.3, 0.04, 0.0],
            vec![0.4, 0.1, 0.02, 0.0],
        ];
        // Means of the parameter's slots: 0.5, 0.2, 0.03. Budget 6: slots 0 and 1 of the
        // parameter (2 each) tie the dense layer's first two (1 each) and win the tie-break on
        // layer order only after them: dense 0.5, param 0.5, dense 0.2, param 0.2 = 6.
        let ranks = redistribute(&c, &ratios, &caps, 6);
        assert_eq!(ranks, vec![2, 2, 2]);
        // Budget 4: dense 0.5 (1), param 0.5 (2), dense 0.2 (1): the parameter's second slot
        // (cost 2) no longer fits and is passed over for cheaper candidates.
        let ranks = redistribute(&c, &ratios, &caps, 4);
        assert_eq!(ranks, vec![2, 1, 1]);
        // Budget 5: the same, then the dense layer's 0.05 (the parameter's 0.2 costs 2).
        assert_eq!(redistribute(&c, &ratios, &caps, 5), vec![3, 1, 1]);
        // An expert without a spectrum follows the other: the means are the live expert's.
        let ratios = vec![ratios[0].clone(), vec![0.0; 4], vec![0.9, 0.05, 0.0, 0.0]];
        assert_eq!(redistribute(&c, &ratios, &caps, 4), vec![2, 1, 1]);
    }
}
