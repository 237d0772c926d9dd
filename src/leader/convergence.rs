//! Sign-free convergence test between consecutive component estimates. Isolated components
//! compare by `|cos|`; clusters of near-equal eigenvalues, whose vectors may rotate inside the
//! cluster, compare by the smallest principal-angle cosine of the cluster subspaces
//! (Björck & Golub 1973). PEFT's signed cosine can flip on a component that did not move.

use crate::linalg;
use crate::Result;
use ndarray::{s, Array2, ArrayView2};

/// Consecutive eigenvalues whose relative gap `(λ_i - λ_{i+1}) / λ_i` is below this form a cluster.
pub const CLUSTER_GAP: f64 = 0.02;

/// Similarity of each current component (columns of `cur`, eigenvalues `values`) to the previous
/// estimate (`prev`, same shape): in `[0, 1]`, 1 when unchanged up to sign or in-cluster rotation.
pub fn similarities(
    prev: ArrayView2<f64>,
    cur: ArrayView2<f64>,
    values: &[f64],
) -> Result<Vec<f64>> {
    let k = cur.ncols().min(prev.ncols());
    let m = prev.slice(s![.., ..k]).t().dot(&cur.slice(s![.., ..k]));
    let mut out = vec![0.0; k];
    let mut a = 0;
    while a < k {
        let mut b = a;
        while b + 1 < k && values[b] - values[b + 1] <= CLUSTER_GAP * values[b].abs() {
            b += 1;
        }
        let sim = if a == b {
            m[(a, a)].abs()
        } else {
            linalg::smallest_singular_value(m.slice(s![a..=b, a..=b]))?
        };
        out[a..=b].iter_mut().for_each(|v| *v = sim.min(1.0));
        a = b + 1;
    }
    Ok(out)
}

/// Flips each column so that its largest-magnitude entry is positive (first one on ties), which
/// makes the output independent of the solver's arbitrary signs.
pub fn normalize_signs(v: &mut Array2<f64>) {
    for mut col in v.columns_mut() {
        let mut best = 0;
        for (i, x) in col.iter().enumerate() {
            if x.abs() > col[best].abs() {
                best = i;
            }
        }
        if col.get(best).is_some_and(|&x| x < 0.0) {
            col.mapv_inplace(|x| -x);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn sign_flips_are_converged_and_rotations_in_clusters_too() {
        let prev = Array2::<f64>::eye(4);
        let mut cur = prev.clone();
        cur.column_mut(0).mapv_inplace(|x| -x);
        // Rotate components 1 and 2 (equal eigenvalues) by 45 degrees.
        let h = std::f64::consts::FRAC_1_SQRT_2;
        cur.slice_mut(s![1..3, 1..3])
            .assign(&array![[h, -h], [h, h]]);
        let sims = similarities(prev.view(), cur.view(), &[4.0, 2.0, 2.0, 1.0]).unwrap();
        assert!(sims.iter().all(|&x| (x - 1.0).abs() < 1e-12), "{sims:?}");
        // The same rotation between well-separated eigenvalues is not converged.
        let sims = similarities(prev.view(), cur.view(), &[4.0, 3.0, 2.0, 1.0]).unwrap();
        assert!((sims[1] - h).abs() < 1e-12 && (sims[2] - h).abs() < 1e-12);
        assert_eq!(sims[3], 1.0);
    }

    #[test]
    fn signs_are_normalized() {
        let mut v = array![[0.1, -0.2], [-0.9, 0.1], [0.3, -0.5]];
        normalize_signs(&mut v);
        assert_eq!(v.column(0).to_vec(), vec![-0.1, 0.9, -0.3]);
        assert_eq!(v.column(1).to_vec(), vec![0.2, -0.1, 0.5]);
    }
}
