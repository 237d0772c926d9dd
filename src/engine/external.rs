//! Runs whose layer inputs come from the caller's own forward passes (the Python package's
//! hooks), not from a [`Source`]: the caller builds the catalog, hands over each pass's rows with
//! [`Engine::accumulate_rows`] (host rows, or rows on the GPU the statistics live on), ends each
//! of its steps with [`Engine::end_external_step`] and asks [`Engine::more_data`] whether every
//! rank still has a batch. Statistics, leader, convergence and output are the CLI's.

use super::{Engine, StepInfo, StopReason};
use crate::catalog::Catalog;
use crate::comm::topology::Topology;
use crate::comm::{self, Communicator};
use crate::config::RunConfig;
use crate::device::cuda::Cuda;
use crate::device::rows::Rows;
use crate::source::stages::Staged;
use crate::source::{Sink, Source};
use crate::{Error, Result};
use ndarray::ArrayView2;
use std::rc::Rc;
use std::sync::Arc;

/// A catalog with one reference row per input, read as unit 0 by [`Engine::new`]: the engine
/// takes the column means of unit 0 (here the row itself) on rank 0 and broadcasts them.
struct References {
    catalog: Catalog,
    units: usize,
    rows: Vec<Vec<f32>>,
    device: Option<Arc<Cuda>>,
}

impl Source for References {
    fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    fn device(&self) -> Option<Arc<Cuda>> {
        self.device.clone()
    }

    fn units(&self) -> usize {
        self.units
    }

    fn read(&mut self, units: &[usize], wanted: &[bool], sink: &mut Sink<'_>) -> Result<()> {
        if units != [0] {
            return Err(Error::Comm(format!(
                "external layer inputs: only unit 0 (the reference) can be read, not {units:?}"
            )));
        }
        for (g, row) in self.rows.iter().enumerate() {
            if wanted[g] {
                let view = ArrayView2::from_shape((1, row.len()), row)
                    .map_err(|e| Error::data(format!("reference of input {g}: {e}")))?;
                sink(g, Rows::Host(view))?;
            }
        }
        Ok(())
    }
}

impl Engine {
    /// Sets up a run over `catalog` on `world` (one stage, every rank a replica), collectively:
    /// `refs` holds one reference row per input (rank 0's are used on every rank; any row near
    /// the data's mean keeps the Gram free of cancellation) and `units` is the number of
    /// examples the caller expects over all ranks (reports only; the caller decides when the
    /// data ends). With `device` the statistics live on that GPU and take its rows in place.
    /// The engine keeps `world` and `cfg` (shared with the caller) for the rest of the run.
    pub fn external(
        catalog: Catalog,
        refs: Vec<Vec<f32>>,
        units: usize,
        source_desc: &str,
        world: Rc<dyn Communicator>,
        cfg: Arc<RunConfig>,
        device: Option<Arc<Cuda>>,
    ) -> Result<Self> {
        let local = check_references(&catalog, &refs);
        comm::agree(&*world, local)?;
        let owner = vec![0; catalog.inputs.len()];
        let mut staged = Staged {
            source: Box::new(References {
                catalog,
                units: units.max(1),
                rows: refs,
                device,
            }),
            desc: source_desc.to_string(),
            owner,
            split: vec!["all layers".into()],
        };
        let topo = Topology::new(world, 1)?;
        Engine::new(&mut staged, topo, cfg)
    }

    /// Adds rows of input `g` (tokens × dim, on the host or on the statistics' GPU) to this
    /// rank's statistics after checking that they are finite; `what` names where they came from
    /// in the error. The time counts as the report's `statistics` (the caller's forward passes
    /// are not eva's: `forward` stays 0).
    pub fn accumulate_rows(
        &mut self,
        g: usize,
        rows: Rows<'_>,
        what: impl FnOnce() -> String,
    ) -> Result<()> {
        let dim = self.catalog.inputs.get(g).map(|i| i.dim);
        if dim != Some(rows.ncols()) {
            return Err(Error::data(format!(
                "{}: {} features, expected {}",
                what(),
                rows.ncols(),
                dim.map_or("a known input".into(), |d| d.to_string())
            )));
        }
        if rows.nrows() == 0 {
            return Ok(());
        }
        let start = std::time::Instant::now();
        rows.check_finite(what)?;
        let added = self.accumulate(g, rows);
        self.times.statistics += start.elapsed().as_secs_f64();
        added
    }

    /// Ends one global step after every rank ran its forward pass: the world agrees on
    /// `local` (this rank's failure, if any, reaches every rank), then reduce, solve, decide.
    /// Returns why the run stops, if it does (convergence or the step cap).
    pub fn end_external_step(
        &mut self,
        local: Result<()>,
        on_step: &mut dyn FnMut(&StepInfo),
    ) -> Result<Option<StopReason>> {
        let (bytes, hidden) = (self.acct.bytes(), self.acct.hidden());
        let label = comm::context(format!(
            "step {}: the agreement after the forward pass",
            self.step + 1
        ));
        self.world().agree(self.settled(local))?;
        drop(label);
        let stop = self.end_step(on_step)?;
        self.step_bytes.push(self.acct.bytes() - bytes);
        self.step_hidden.push(self.acct.hidden() - hidden);
        Ok(stop.or_else(|| {
            self.cfg
                .max_steps
                .is_some_and(|m| self.step >= m)
                .then_some(StopReason::MaxSteps)
        }))
    }

    /// Whether every rank has another batch (collective): the run ends for all ranks as soon as
    /// one rank's data runs out.
    pub fn more_data(&self, have: bool) -> Result<bool> {
        let _label = comm::context(format!("step {}: do all ranks have data", self.step + 1));
        let mut missing = [f64::from(u8::from(!have))];
        self.world().all_reduce_sum(&mut missing)?;
        Ok(missing[0] == 0.0)
    }

    /// Global steps done so far.
    pub fn steps_done(&self) -> usize {
        self.step
    }
}

/// One finite reference row of the right length per input.
fn check_references(catalog: &Catalog, refs: &[Vec<f32>]) -> Result<()> {
    if refs.len() != catalog.inputs.len() {
        return Err(Error::data(format!(
            "{} reference rows for {} inputs",
            refs.len(),
            catalog.inputs.len()
        )));
    }
    for (g, (r, inp)) in refs.iter().zip(&catalog.inputs).enumerate() {
        if r.len() != inp.dim || r.iter().any(|v| !v.is_finite()) {
            return Err(Error::data(format!(
                "input {g} ({}): the reference row needs {} finite values",
                catalog.layers[inp.members[0]].name, inp.dim
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::SingleProcess;
    use crate::config::{EstimatorChoice, EvaParams};

    fn config() -> Arc<RunConfig> {
        Arc::new(RunConfig {
            eva: EvaParams {
                rank: 2,
                ..EvaParams::default()
            },
            batch_size: 1,
            max_steps: Some(3),
            no_early_stop: false,
            refine_converged: false,
            estimator: EstimatorChoice::Exact,
            sketch_size: None,
            stats_memory: 1 << 30,
            seed: 0,
            out: "unused".into(),
            force: false,
            base_model: None,
            task_type: None,
            quiet: true,
            checkpoint: None,
        })
    }

    #[test]
    fn external_rows_give_the_components_and_bad_rows_fail() {
        let cfg = config();
        let catalog = Catalog::new(
            vec![("a".into(), 6, 3), ("b".into(), 6, 5)],
            vec![vec![0, 1]],
        );
        let world: Rc<dyn Communicator> = Rc::new(SingleProcess);
        let mut e =
            Engine::external(catalog, vec![vec![0.0; 6]], 10, "test", world, cfg, None).unwrap();
        // Rows spread along the first two axes only: the components are e0 and e1.
        let mut stop = None;
        for step in 0..3 {
            let rows: Vec<f32> = (0..40)
                .flat_map(|i| {
                    let t = (i + step * 40) as f32;
                    [3.0 * t.sin(), 2.0 * (1.7 * t).cos(), 0.0, 0.0, 0.0, 0.0]
                })
                .collect();
            let rows = ArrayView2::from_shape((40, 6), &rows).unwrap();
            assert!(e.more_data(true).unwrap());
            e.accumulate_rows(0, Rows::Host(rows), || "test".into())
                .unwrap();
            stop = e.end_external_step(Ok(()), &mut |_| {}).unwrap();
            if stop.is_some() {
                break;
            }
        }
        let nan = [f32::NAN; 6];
        let nan = ArrayView2::from_shape((1, 6), &nan).unwrap();
        let err = e
            .accumulate_rows(0, Rows::Host(nan), || "layer a".into())
            .unwrap_err();
        assert!(err.to_string().contains("layer a: non-finite"), "{err}");
        let wide = [0.0f32; 7];
        let wide = ArrayView2::from_shape((1, 7), &wide).unwrap();
        assert!(e
            .accumulate_rows(0, Rows::Host(wide), || "w".into())
            .is_err());
        let out = e.finish(stop.unwrap_or(StopReason::DataExhausted)).unwrap();
        let a = &out.adapter.layers[0].a;
        assert!(a[[0, 0]].abs() > 0.999 || a[[0, 1]].abs() > 0.999, "{a:?}");
        for r in 0..a.nrows() {
            assert!(a.row(r).iter().skip(2).all(|v| v.abs() < 1e-5), "{a:?}");
        }
    }

    #[test]
    fn a_failure_on_the_step_is_returned() {
        let cfg = config();
        let catalog = Catalog::new(vec![("a".into(), 4, 4)], vec![vec![0]]);
        let world: Rc<dyn Communicator> = Rc::new(SingleProcess);
        let mut e = Engine::external(
            catalog,
            vec![vec![0.0; 4]],
            10,
            "test",
            world.clone(),
            cfg.clone(),
            None,
        )
        .unwrap();
        let err = e
            .end_external_step(Err(Error::data("forward failed")), &mut |_| {})
            .unwrap_err();
        assert_eq!(err.to_string(), "forward failed");
        let bad = Catalog::new(vec![("a".into(), 4, 4)], vec![vec![0]]);
        assert!(Engine::external(bad, vec![vec![0.0; 3]], 1, "t", world, cfg, None).is_err());
    }

    /// A run over one input `a` of 6 features, its statistics on `device` if given.
    fn one_input(device: Option<Arc<Cuda>>) -> Engine {
        let catalog = Catalog::new(vec![("a".into(), 6, 3)], vec![vec![0]]);
        let world: Rc<dyn Communicator> = Rc::new(SingleProcess);
        Engine::external(
            catalog,
            vec![vec![0.0; 6]],
            10,
            "test",
            world,
            config(),
            device,
        )
        .unwrap()
    }

    /// Rows handed over from Python whose squares overflow f32 fail the step that took them at
    /// its solve, naming the input (the CLI's check, on the same engine).
    #[test]
    fn rows_whose_squares_overflow_f32_fail_their_step() {
        let mut e = one_input(None);
        let mut rows = ndarray::Array2::from_shape_fn((40, 6), |(i, j)| ((i + j) % 5) as f32);
        rows[(7, 2)] = 3e19;
        e.accumulate_rows(0, Rows::Host(rows.view()), || "batch 1".into())
            .unwrap();
        let err = e.end_external_step(Ok(()), &mut |_| {}).unwrap_err();
        let err = err.to_string();
        assert!(
            err.contains("input of a:") && err.contains("overflow f32 (feature 2"),
            "{err}"
        );
    }

    /// Rows on the GPU are checked without a download: a non-finite value fails the step that
    /// took it at the agreement that ends the step, before its all-reduce, in the host check's
    /// words; the step is not counted.
    #[cfg(feature = "cuda-emu")]
    #[test]
    fn nonfinite_device_rows_fail_their_step_before_the_all_reduce() {
        use crate::device::gpu::{CudaOptions, Gpu};
        use ndarray::Array2;
        let gpu = Arc::new(Cuda::open(CudaOptions::default()).unwrap());
        let mut e = one_input(Some(gpu.clone()));
        let good = Array2::from_shape_fn((40, 6), |(i, j)| ((i * 7 + j * 3) % 11) as f32);
        let x = gpu.to_device(&good).unwrap();
        e.accumulate_rows(0, Rows::Device { gpu: &gpu, x: &x }, || "batch 1".into())
            .unwrap();
        e.end_external_step(Ok(()), &mut |_| {}).unwrap();
        let mut bad = good.clone();
        bad[(3, 4)] = f32::NAN;
        bad[(5, 0)] = f32::INFINITY;
        let y = gpu.to_device(&bad).unwrap();
        e.accumulate_rows(0, Rows::Device { gpu: &gpu, x: &y }, || "batch 2".into())
            .expect("queued: the verdict comes at the step's end");
        let err = e.end_external_step(Ok(()), &mut |_| {}).unwrap_err();
        assert_eq!(
            err.to_string(),
            "batch 2: non-finite activation NaN at token 3, feature 4"
        );
        assert_eq!(e.steps_done(), 1, "the failed step was not reduced");
    }
}
