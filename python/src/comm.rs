//! [`Communicator`] over the job's `torch.distributed` process group: each collective calls a
//! method of a Python object (`eva_lora._dist.TorchComm`) with bytes and gets bytes back.

use eva::comm::Communicator;
use eva::{Error, Result};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

/// The collectives of a Python object.
pub struct PyComm {
    obj: PyObject,
    rank: usize,
    size: usize,
}

impl PyComm {
    /// Reads `rank` and `size` from `obj`.
    pub fn new(py: Python<'_>, obj: PyObject) -> PyResult<Self> {
        let rank = obj.getattr(py, "rank")?.extract(py)?;
        let size = obj.getattr(py, "size")?.extract(py)?;
        Ok(PyComm { obj, rank, size })
    }

    /// Calls `method(args)` and hands its result to `then`; a Python exception becomes a
    /// communication error that names the collective.
    fn call<T>(
        &self,
        method: &str,
        args: impl for<'py> FnOnce(Python<'py>) -> PyResult<Bound<'py, PyTuple>>,
        then: impl for<'py> FnOnce(Bound<'py, PyAny>) -> PyResult<T>,
    ) -> Result<T> {
        Python::with_gil(|py| {
            let out = args(py).and_then(|a| self.obj.bind(py).call_method1(method, a));
            out.and_then(then).map_err(|e| {
                Error::Comm(format!(
                    "torch.distributed {method} on rank {}: {e}",
                    self.rank
                ))
            })
        })
    }
}

fn bytes_of(v: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    Ok(v.downcast::<PyBytes>()?.as_bytes().to_vec())
}

impl Communicator for PyComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()> {
        let bytes: Vec<u8> = buf.iter().flat_map(|v| v.to_le_bytes()).collect();
        let out = self.call(
            "all_reduce_sum",
            |py| (PyBytes::new(py, &bytes),).into_pyobject(py),
            |v| bytes_of(&v),
        )?;
        if out.len() != bytes.len() {
            return Err(Error::Comm(format!(
                "torch.distributed all_reduce_sum returned {} bytes for {}",
                out.len(),
                bytes.len()
            )));
        }
        for (v, c) in buf.iter_mut().zip(out.chunks_exact(8)) {
            *v = f64::from_le_bytes(c.try_into().expect("8 bytes"));
        }
        Ok(())
    }

    fn broadcast(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        *buf = self.call(
            "broadcast",
            |py| (PyBytes::new(py, buf), root).into_pyobject(py),
            |v| bytes_of(&v),
        )?;
        Ok(())
    }

    fn gather(&self, send: &[u8], root: usize) -> Result<Option<Vec<Vec<u8>>>> {
        self.call(
            "gather",
            |py| (PyBytes::new(py, send), root).into_pyobject(py),
            |v| {
                if v.is_none() {
                    return Ok(None);
                }
                v.downcast::<PyList>()?
                    .iter()
                    .map(|b| bytes_of(&b))
                    .collect::<PyResult<Vec<_>>>()
                    .map(Some)
            },
        )
    }

    fn barrier(&self) -> Result<()> {
        self.call("barrier", |py| Ok(PyTuple::empty(py)), |_| Ok(()))
    }

    fn split(&self, _color: usize, _key: usize) -> Result<Box<dyn Communicator>> {
        Err(Error::Comm(
            "eva_lora runs one pipeline stage: splitting the torch.distributed group is not supported".into(),
        ))
    }

    fn send(&self, buf: &[u8], dest: usize) -> Result<()> {
        self.call(
            "send",
            |py| (PyBytes::new(py, buf), dest).into_pyobject(py),
            |_| Ok(()),
        )
    }

    fn recv(&self, src: usize) -> Result<Vec<u8>> {
        self.call("recv", |py| (src,).into_pyobject(py), |v| bytes_of(&v))
    }

    fn backend(&self) -> &'static str {
        "torch.distributed"
    }
}
