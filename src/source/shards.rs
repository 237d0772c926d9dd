//! `--activations DIR`: every `*.safetensors` file, in file-name order, is one unit. A tensor named
//! after a layer's module path holds its input rows `[tokens, in_features]` (F32, F16 or BF16); the
//! metadata key `out_features` maps layer names to output sizes. Layers whose tensors are
//! byte-identical in the first unit form one equal-input group (DESIGN.md §3).

use super::{check_finite, natural_cmp, Catalog, Sink, Source};
use crate::{Error, Result};
use ndarray::Array2;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Activation shards in a directory.
pub struct ShardSource {
    files: Vec<PathBuf>,
    catalog: Catalog,
    /// Tensor name read for each unique input (the group's representative).
    input_names: Vec<String>,
}

fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path)
        .map_err(|e| Error::io("cannot open activation shard", path, e))?;
    // SAFETY: the map is read-only and private to this process; shards must not be modified
    // while eva runs (documented in docs/formats.md).
    unsafe { memmap2::Mmap::map(&file) }
        .map_err(|e| Error::io("cannot map activation shard", path, e))
}

fn parse<'a>(path: &Path, unit: usize, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| {
        Error::data(format!(
            "activation shard {} (unit {unit}): not a valid safetensors file ({} bytes): {e}",
            path.display(),
            bytes.len()
        ))
    })
}

fn check_dtype(path: &Path, unit: usize, name: &str, dtype: Dtype) -> Result<()> {
    match dtype {
        Dtype::F32 | Dtype::F16 | Dtype::BF16 => Ok(()),
        other => Err(Error::data(format!(
            "activation shard {} (unit {unit}), layer {name}: dtype {other:?} is not supported (expected F32, F16 or BF16)",
            path.display()
        ))),
    }
}

/// Borrows F32 bytes as rows without copying when they are aligned (little-endian hosts).
fn borrow_f32(
    dtype: Dtype,
    bytes: &[u8],
    rows: usize,
    cols: usize,
) -> Option<ndarray::ArrayView2<'_, f32>> {
    if dtype != Dtype::F32 || cfg!(target_endian = "big") {
        return None;
    }
    // SAFETY: every bit pattern is a valid f32; `align_to` only yields the aligned middle.
    let (pre, mid, post) = unsafe { bytes.align_to::<f32>() };
    if !pre.is_empty() || !post.is_empty() {
        return None;
    }
    ndarray::ArrayView2::from_shape((rows, cols), mid).ok()
}

/// Decodes little-endian F32/F16/BF16 bytes into f32 rows.
fn decode(dtype: Dtype, bytes: &[u8], rows: usize, cols: usize) -> Array2<f32> {
    let values: Vec<f32> = match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect(),
        _ => unreachable!("dtype checked when the shard was opened"),
    };
    Array2::from_shape_vec((rows, cols), values).expect("safetensors validated the byte length")
}

impl ShardSource {
    /// Opens `dir`, validates every shard's header against the first and finds equal-input groups.
    pub fn open(dir: &Path) -> Result<Self> {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| Error::io("cannot read activations directory", dir, e))?;
        let mut files = Vec::new();
        for entry in entries {
            let entry =
                entry.map_err(|e| Error::io("cannot read activations directory", dir, e))?;
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "safetensors") && path.is_file() {
                files.push(path);
            }
        }
        files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
        let Some(first) = files.first() else {
            return Err(Error::data(format!(
                "activations directory {} holds no *.safetensors files (expected one file per unit)",
                dir.display()
            )));
        };

        let map = map_file(first)?;
        let st = parse(first, 0, &map)?;
        let (_, meta) = SafeTensors::read_metadata(&map).expect("parsed above");
        let out_features = parse_out_features(first, meta.metadata())?;
        let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        names.sort_by(|a, b| natural_cmp(a, b));
        if names.is_empty() {
            return Err(Error::data(format!(
                "activation shard {} (unit 0) holds no tensors",
                first.display()
            )));
        }
        let mut layers = Vec::new();
        // Equal-input groups: same dtype, shape and bytes in the first unit.
        type Content<'a> = (String, Vec<usize>, &'a [u8]);
        let mut by_content: HashMap<Content, Vec<usize>> = HashMap::new();
        for (i, name) in names.iter().enumerate() {
            let view = st.tensor(name).expect("name listed by the file");
            check_dtype(first, 0, name, view.dtype())?;
            let [_, d] = view.shape() else {
                return Err(Error::data(format!(
                    "activation shard {} (unit 0), layer {name}: expected a 2-D tensor [tokens, in_features], found shape {:?}",
                    first.display(),
                    view.shape()
                )));
            };
            let out = *out_features.get(name).ok_or_else(|| {
                Error::data(format!(
                    "activation shard {} (unit 0): metadata `out_features` has no entry for layer {name}",
                    first.display()
                ))
            })?;
            if *d == 0 || out == 0 {
                return Err(Error::data(format!(
                    "activation shard {} (unit 0), layer {name}: in_features = {d} and out_features = {out} must be positive",
                    first.display()
                )));
            }
            layers.push((name.clone(), *d, out));
            // An empty tensor says nothing about later units: it stays alone.
            let key = (
                format!("{:?}", view.dtype()),
                view.shape().to_vec(),
                view.data(),
            );
            if view.data().is_empty() {
                by_content.insert((format!("empty:{name}"), Vec::new(), &[]), vec![i]);
            } else {
                by_content.entry(key).or_default().push(i);
            }
        }
        let mut groups: Vec<Vec<usize>> = by_content.into_values().collect();
        groups.sort_by_key(|g| g[0]);
        drop(st);
        drop(map);

        let catalog = Catalog::new(layers, groups);
        let input_names = catalog
            .inputs
            .iter()
            .map(|i| catalog.layers[i.members[0]].name.clone())
            .collect();
        let source = ShardSource {
            files,
            catalog,
            input_names,
        };
        for unit in 1..source.files.len() {
            source.check_header(unit)?;
        }
        Ok(source)
    }

    /// Checks that a later unit has every layer, 2-D, a supported dtype and the same in_features.
    fn check_header(&self, unit: usize) -> Result<()> {
        let path = &self.files[unit];
        let map = map_file(path)?;
        let st = parse(path, unit, &map)?;
        for layer in &self.catalog.layers {
            let view = st.tensor(&layer.name).map_err(|_| {
                Error::data(format!(
                    "activation shard {} (unit {unit}): layer {} is missing (it is in the first shard)",
                    path.display(),
                    layer.name
                ))
            })?;
            check_dtype(path, unit, &layer.name, view.dtype())?;
            match view.shape() {
                [_, d] if *d == layer.in_features => {}
                [_, d] => {
                    return Err(Error::data(format!(
                        "activation shard {} (unit {unit}), layer {}: in_features changed from {} (unit 0) to {d}",
                        path.display(),
                        layer.name,
                        layer.in_features
                    )))
                }
                shape => {
                    return Err(Error::data(format!(
                        "activation shard {} (unit {unit}), layer {}: expected a 2-D tensor [tokens, in_features], found shape {shape:?}",
                        path.display(),
                        layer.name
                    )))
                }
            }
        }
        Ok(())
    }

    /// The shard files, one per unit.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

fn parse_out_features(
    path: &Path,
    meta: &Option<HashMap<String, String>>,
) -> Result<BTreeMap<String, usize>> {
    let raw = meta.as_ref().and_then(|m| m.get("out_features")).ok_or_else(|| {
        Error::data(format!(
            "activation shard {} (unit 0): metadata key `out_features` is missing (expected a JSON object mapping layer names to output sizes)",
            path.display()
        ))
    })?;
    serde_json::from_str::<BTreeMap<String, usize>>(raw).map_err(|e| {
        Error::data(format!(
            "activation shard {} (unit 0): metadata `out_features` is not a JSON object of layer name -> positive integer: {e}",
            path.display()
        ))
    })
}

impl Source for ShardSource {
    fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    fn units(&self) -> usize {
        self.files.len()
    }

    fn read(&mut self, units: &[usize], wanted: &[bool], sink: &mut Sink<'_>) -> Result<()> {
        for &unit in units {
            let path = &self.files[unit];
            let map = map_file(path)?;
            let st = parse(path, unit, &map)?;
            for (input, name) in self.input_names.iter().enumerate() {
                if !wanted[input] {
                    continue;
                }
                let view = st.tensor(name).map_err(|_| {
                    Error::data(format!(
                        "activation shard {} (unit {unit}): layer {name} is missing",
                        path.display()
                    ))
                })?;
                let d = self.catalog.inputs[input].dim;
                let rows = match view.shape() {
                    [n, dd] if *dd == d => *n,
                    shape => {
                        return Err(Error::data(format!(
                            "activation shard {} (unit {unit}), layer {name}: expected shape [tokens, {d}], found {shape:?}",
                            path.display()
                        )))
                    }
                };
                check_dtype(path, unit, name, view.dtype())?;
                let decoded;
                let x = match borrow_f32(view.dtype(), view.data(), rows, d) {
                    Some(x) => x,
                    None => {
                        decoded = decode(view.dtype(), view.data(), rows, d);
                        decoded.view()
                    }
                };
                check_finite(x, || {
                    format!(
                        "activation shard {} (unit {unit}), layer {name}",
                        path.display()
                    )
                })?;
                sink(input, x)?;
            }
        }
        Ok(())
    }
}
