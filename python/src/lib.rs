//! `eva_lora._eva`: eva's engine for Python. The hooks of `eva_lora` hand each target layer's
//! input rows to a [`Run`], which holds the engine (statistics, leader, convergence, final
//! allocation) and talks to the other ranks through [`comm::PyComm`], the job's own
//! `torch.distributed` process group.

mod comm;
mod options;

use eva::catalog::Catalog;
use eva::comm::{Communicator, SingleProcess};
use eva::config::validate::DType;
use eva::config::RunConfig;
use eva::device::cuda::Cuda;
use eva::device::gpu::{CudaOptions, Gpu as _};
use eva::device::rows::Rows;
use eva::engine::{Engine, StopReason};
use ndarray::ArrayView2;
use pyo3::buffer::PyBuffer;
use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::rc::Rc;
use std::sync::Arc;

create_exception!(
    _eva,
    EvaError,
    PyValueError,
    "An error eva reports: bad input, data that cannot give an adapter, or another rank's failure."
);

/// The calling thread's CUDA context, current again when this is dropped: every entry point that
/// may reach the GPU holds one, because cudarc makes eva's context current and leaves it so, and
/// PyTorch's current device is the current context's (issue 25, defect 3).
#[cfg(feature = "cuda")]
fn caller_context() -> eva::device::cuda::CallerContext {
    eva::device::cuda::CallerContext::save()
}

/// Without CUDA there is no context to keep.
#[cfg(not(feature = "cuda"))]
fn caller_context() -> NoContext {
    NoContext
}

#[cfg(not(feature = "cuda"))]
struct NoContext;

/// The Python exception of an eva error.
fn py_err(e: eva::Error) -> PyErr {
    EvaError::new_err(e.to_string())
}

/// What [`Run::finish`] returns: the layers with rank > 0 as (name, rank, alpha, `lora_A`
/// bytes), the adapter_config.json text and the eva_report.json text.
type Finished<'py> = (
    Vec<(String, usize, f64, Bound<'py, PyBytes>)>,
    String,
    String,
);

/// One EVA run over the caller's forward passes. The engine owns its configuration and its
/// communicator (`unsendable`: the communicator calls back into the caller's process group on
/// the thread that made it).
#[pyclass(unsendable, module = "eva_lora._eva")]
struct Run {
    engine: Option<Engine>,
    /// The GPU the statistics live on (`device` given), whose rows are read in place.
    gpu: Option<Arc<Cuda>>,
}

/// A GPU opened for eva's statistics: `eva_lora` opens it on each rank before the collective
/// [`Run`], so that a GPU that cannot be used fails there (or falls back to the host) instead of
/// inside a collective.
#[pyclass(unsendable, module = "eva_lora._eva")]
struct Gpu(Option<Arc<Cuda>>);

#[pymethods]
impl Gpu {
    /// Opens CUDA device `ordinal` (eva's library probe, context, NVRTC kernels, cuBLAS).
    #[new]
    fn new(ordinal: usize) -> PyResult<Self> {
        let _ctx = caller_context();
        let opts = CudaOptions {
            ordinal,
            dtype: DType::F32,
            slice: "the PyTorch model's layer inputs".into(),
        };
        Ok(Gpu(Some(Arc::new(Cuda::open(opts).map_err(py_err)?))))
    }

    /// Registers `release()` (PyTorch's `torch.cuda.empty_cache`): memory PyTorch's caching
    /// allocator holds is free for PyTorch but used for the driver, so eva calls it before it
    /// decides that the GPU is out of memory (issue 25, defect 6).
    fn on_low_memory(&self, release: PyObject) {
        self.cuda().on_low_memory(Box::new(move || {
            Python::with_gil(|py| {
                if let Err(e) = release.call0(py) {
                    // eva's own out-of-memory error follows if releasing did not help.
                    e.print(py);
                }
            })
        }));
    }
}

impl Gpu {
    fn cuda(&self) -> &Arc<Cuda> {
        self.0
            .as_ref()
            .expect("a Gpu holds its device until dropped")
    }
}

impl Drop for Gpu {
    /// The last reference frees eva's stream, cuBLAS handle and module: under the caller's
    /// context, kept.
    fn drop(&mut self) {
        let _ctx = caller_context();
        self.0.take();
    }
}

/// A C-contiguous 2-D f32 buffer (a NumPy array, a CPU tensor's `.numpy()`) as a view, no copy.
fn rows_of(buf: &PyBuffer<f32>) -> PyResult<ArrayView2<'_, f32>> {
    let shape = buf.shape();
    if shape.len() != 2 || !buf.is_c_contiguous() {
        return Err(EvaError::new_err(format!(
            "layer input rows must be a C-contiguous 2-D float32 array, found shape {shape:?}"
        )));
    }
    // SAFETY: the buffer is C-contiguous f32 of `shape` and stays alive (and is not written:
    // the hook holds the tensor) while the view is used within this call.
    let data =
        unsafe { std::slice::from_raw_parts(buf.buf_ptr() as *const f32, shape[0] * shape[1]) };
    ArrayView2::from_shape((shape[0], shape[1]), data).map_err(|e| EvaError::new_err(e.to_string()))
}

impl Run {
    fn engine(&mut self) -> PyResult<&mut Engine> {
        self.engine
            .as_mut()
            .ok_or_else(|| EvaError::new_err("this eva run has finished"))
    }
}

#[pymethods]
impl Run {
    /// `layers`: (name, in_features, out_features) in model order; `groups`: the layer indices
    /// that read one input; `refs`: one float32 row per group (rank 0's are used);
    /// `comm`: an object with the collectives (see `eva_lora._dist.TorchComm`), or None for one
    /// process; `device`: the [`Gpu`] to keep the statistics on (its layer inputs then go to
    /// [`Run::accumulate_cuda`]), or None for host statistics. Collective over the ranks.
    #[new]
    #[pyo3(signature = (layers, groups, refs, units, desc, options, comm=None, device=None, params=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        layers: Vec<(String, usize, usize)>,
        groups: Vec<Vec<usize>>,
        refs: Vec<Vec<f32>>,
        units: usize,
        desc: &str,
        options: &Bound<'_, PyDict>,
        comm: Option<PyObject>,
        device: Option<PyRef<'_, Gpu>>,
        params: Option<Vec<Option<(String, usize, usize)>>>,
    ) -> PyResult<Self> {
        let _ctx = caller_context();
        let cfg: Arc<RunConfig> = Arc::new(options::config(options)?);
        let gpu = device.map(|g| g.cuda().clone());
        let comm: Rc<dyn Communicator> = match comm {
            None => Rc::new(SingleProcess),
            Some(obj) => Rc::new(comm::PyComm::new(py, obj)?),
        };
        let catalog = check_catalog(layers, groups)?;
        let catalog = match params {
            None => catalog,
            Some(p) => with_params(catalog, p)?,
        };
        let engine = Engine::external(catalog, refs, units, desc, comm, cfg, gpu.clone())
            .map_err(py_err)?;
        Ok(Run {
            engine: Some(engine),
            gpu,
        })
    }

    /// The raw `CUstream` eva's GPU work runs on (0: the legacy default stream), or None without
    /// a GPU: the caller orders its tensors against it (`torch.cuda.ExternalStream`).
    fn cuda_stream(&self) -> Option<usize> {
        self.gpu.as_ref().map(|g| g.raw_stream())
    }

    /// Which inputs accumulate in the current step.
    fn accumulating(&mut self) -> PyResult<Vec<bool>> {
        let _ctx = caller_context();
        Ok(self.engine()?.accumulating().to_vec())
    }

    /// Adds rows (tokens × in_features, C-contiguous float32, read in place) of input `g`;
    /// `what` names them in errors.
    fn accumulate(&mut self, g: usize, rows: &Bound<'_, PyAny>, what: &str) -> PyResult<()> {
        let _ctx = caller_context();
        let buf = PyBuffer::<f32>::get(rows)?;
        let view = rows_of(&buf)?;
        self.engine()?
            .accumulate_rows(g, Rows::Host(view), || what.to_string())
            .map_err(py_err)
    }

    /// Adds rows of input `g` that live on the run's GPU, read in place: `ptr` addresses
    /// `rows × cols` C-contiguous float32 values (a CUDA tensor's `data_ptr()`, which the caller
    /// keeps alive and unchanged until eva's stream has read them: `record_stream`).
    #[cfg_attr(not(feature = "cuda"), allow(unreachable_code, unused_variables))]
    fn accumulate_cuda(
        &mut self,
        g: usize,
        ptr: u64,
        rows: usize,
        cols: usize,
        what: &str,
    ) -> PyResult<()> {
        let _ctx = caller_context();
        let gpu = self
            .gpu
            .clone()
            .ok_or_else(|| EvaError::new_err("this eva run keeps its statistics on the host"))?;
        if ptr == 0 && rows * cols > 0 {
            return Err(EvaError::new_err(format!("{what}: a null device pointer")));
        }
        // SAFETY: the caller's contract above (eva_lora's hooks hold the tensor and record it
        // on eva's stream).
        let x = unsafe { gpu.borrow(ptr, rows, cols) };
        self.engine()?
            .accumulate_rows(g, Rows::Device { gpu: &gpu, x: &x }, || what.to_string())
            .map_err(py_err)
    }

    /// Whether every rank has another batch (collective).
    fn more_data(&mut self, have: bool) -> PyResult<bool> {
        let _ctx = caller_context();
        self.engine()?.more_data(have).map_err(py_err)
    }

    /// Ends a step (collective): `error` is this rank's failure in its forward pass, if any.
    /// `on_step(step, converged_layers, layers, tokens)` is called on rank 0. Returns why the
    /// run stops (`converged`, `max_steps`) or None.
    #[pyo3(signature = (error=None, on_step=None))]
    fn end_step(
        &mut self,
        py: Python<'_>,
        error: Option<String>,
        on_step: Option<PyObject>,
    ) -> PyResult<Option<&'static str>> {
        let _ctx = caller_context();
        let local = error.map_or(Ok(()), |e| Err(eva::Error::data(e)));
        let mut callback_err = None;
        let stop = self
            .engine()?
            .end_external_step(local, &mut |info| {
                if let Some(f) = &on_step {
                    let args = (info.step, info.converged_layers, info.layers, info.tokens);
                    if let Err(e) = f.call1(py, args) {
                        callback_err.get_or_insert(e);
                    }
                }
            })
            .map_err(py_err)?;
        if let Some(e) = callback_err {
            return Err(e);
        }
        Ok(stop.map(StopReason::as_str))
    }

    /// Global steps done.
    #[getter]
    fn steps(&mut self) -> PyResult<usize> {
        Ok(self.engine()?.steps_done())
    }

    /// Ends the run (collective): final solves and allocation. Returns the layers with rank > 0
    /// as (name, rank, alpha, lora_A as little-endian float32 bytes, rank × in_features), the
    /// adapter_config.json and the eva_report.json text.
    fn finish<'py>(&mut self, py: Python<'py>, stop: &str) -> PyResult<Finished<'py>> {
        let _ctx = caller_context();
        let stop = match stop {
            "converged" => StopReason::Converged,
            "max_steps" => StopReason::MaxSteps,
            "data_exhausted" => StopReason::DataExhausted,
            "all_data" => StopReason::AllData,
            other => return Err(EvaError::new_err(format!("unknown stop reason {other}"))),
        };
        let engine = self
            .engine
            .take()
            .ok_or_else(|| EvaError::new_err("this eva run has finished"))?;
        let outcome = engine.finish(stop).map_err(py_err)?;
        let layers = outcome
            .adapter
            .layers
            .iter()
            .map(|l| {
                let bytes: Vec<u8> = l.a.iter().flat_map(|v| v.to_le_bytes()).collect();
                (l.name.clone(), l.rank, l.alpha, PyBytes::new(py, &bytes))
            })
            .collect();
        let config = serde_json::to_string_pretty(&outcome.adapter.config)
            .map_err(|e| EvaError::new_err(e.to_string()))?;
        let report = serde_json::to_string_pretty(&outcome.report)
            .map_err(|e| EvaError::new_err(e.to_string()))?;
        Ok((layers, config, report))
    }
}

impl Drop for Run {
    /// Dropping the engine frees device memory (eva's context bound): under the caller's
    /// context, kept.
    fn drop(&mut self) {
        let _ctx = caller_context();
        self.engine.take();
        self.gpu.take();
    }
}

/// A catalog from the hooks' layers and groups, each layer in exactly one group.
fn check_catalog(
    layers: Vec<(String, usize, usize)>,
    groups: Vec<Vec<usize>>,
) -> PyResult<Catalog> {
    let mut seen = vec![0usize; layers.len()];
    for g in &groups {
        if g.is_empty() {
            return Err(EvaError::new_err("an equal-input group without layers"));
        }
        for &m in g {
            match seen.get_mut(m) {
                Some(s) => *s += 1,
                None => {
                    return Err(EvaError::new_err(format!(
                        "group member {m} is not a layer"
                    )))
                }
            }
        }
        let d = layers[g[0]].1;
        if let Some(&m) = g.iter().find(|&&m| layers[m].1 != d) {
            return Err(EvaError::new_err(format!(
                "layers {} and {} read the same input but have {} and {} input features",
                layers[g[0]].0, layers[m].0, d, layers[m].1
            )));
        }
    }
    if let Some(i) = seen.iter().position(|&s| s != 1) {
        return Err(EvaError::new_err(format!(
            "layer {} is in {} equal-input groups, expected one",
            layers[i].0, seen[i]
        )));
    }
    if layers.is_empty() {
        return Err(EvaError::new_err("no target layers"));
    }
    Ok(Catalog::new(layers, groups))
}

/// Tags layers as experts' slices of 3-D parameters (`(parameter, expert, experts)` per layer,
/// `None` for a module): every expert of a parameter present once, in order, one after another,
/// each its own equal-input group, all of one shape.
fn with_params(
    catalog: Catalog,
    params: Vec<Option<(String, usize, usize)>>,
) -> PyResult<Catalog> {
    if params.len() != catalog.layers.len() {
        return Err(EvaError::new_err(format!(
            "{} parameter tags for {} layers",
            params.len(),
            catalog.layers.len()
        )));
    }
    let mut i = 0;
    while i < params.len() {
        let Some((name, 0, experts)) = &params[i] else {
            if let Some((name, e, _)) = &params[i] {
                return Err(EvaError::new_err(format!(
                    "expert {e} of {name} comes before expert 0"
                )));
            }
            i += 1;
            continue;
        };
        for e in 0..*experts {
            let ok = params.get(i + e).is_some_and(|p| {
                p.as_ref()
                    .is_some_and(|(n, x, k)| n == name && *x == e && k == experts)
            });
            let layer = catalog.layers.get(i + e);
            let alone = layer.is_some_and(|l| catalog.inputs[l.input].members.len() == 1);
            let same = layer.is_some_and(|l| {
                (l.in_features, l.out_features)
                    == (catalog.layers[i].in_features, catalog.layers[i].out_features)
            });
            if !(ok && alone && same) {
                return Err(EvaError::new_err(format!(
                    "the {experts} experts of {name} must follow one another in order, each with its own input and one shape (expert {e} does not)"
                )));
            }
        }
        i += experts;
    }
    let tags = params
        .into_iter()
        .map(|p| p.map(|(n, e, k)| eva::catalog::Param::new(&n, e, k)))
        .collect();
    Ok(catalog.with_params(tags))
}

/// The extension module.
#[pymodule]
fn _eva(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Run>()?;
    m.add_class::<Gpu>()?;
    m.add("EvaError", m.py().get_type::<EvaError>())?;
    m.add("DEFAULT_STATS_MEMORY", eva::config::DEFAULT_STATS_MEMORY)?;
    // Whether CUDA layer inputs can stay on the GPU (the `cuda` feature).
    m.add("CUDA", cfg!(feature = "cuda"))?;
    Ok(())
}
