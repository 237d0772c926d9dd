//! `--activations DIR`: every `*.safetensors` file, in file-name order, is one unit — or part of
//! one: files named `<unit>.stage-<NN>.safetensors` together make unit `<unit>`, each holding the
//! layers of one training pipeline stage, so that a pipeline-parallel job can dump each stage's
//! activations where they are (docs/formats.md). A tensor named after a layer's module path holds
//! its input rows `[tokens, in_features]` (F32, F16 or BF16); the metadata key `out_features`
//! maps layer names to output sizes. Layers whose tensors are byte-identical in the first unit
//! form one equal-input group. A read touches only the files, and the tensors, of the inputs it
//! wants: with `--pp`, a stage reads only its layers.

use super::{natural_cmp, Sink, Source};
use crate::catalog::Catalog;
use crate::device::rows::{check_finite, Rows};
use crate::{Error, Result};
use ndarray::Array2;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Activation shards in a directory.
pub struct ShardSource {
    /// The files of each unit (one, or one per training stage in stage order), in unit order.
    units: Vec<Vec<PathBuf>>,
    catalog: Catalog,
    /// Tensor name read for each unique input (the group's representative).
    input_names: Vec<String>,
    /// Per unit, per unique input: which of the unit's files holds it.
    holder: Vec<Vec<usize>>,
}

/// The unit a file belongs to and its stage: `u.stage-03.safetensors` is stage 3 of unit `u`;
/// `u.safetensors` is all of unit `u`.
fn unit_of(name: &str) -> (&str, Option<usize>) {
    let stem = name.strip_suffix(".safetensors").unwrap_or(name);
    if let Some((unit, stage)) = stem.rsplit_once(".stage-") {
        if !stage.is_empty() && stage.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(s) = stage.parse() {
                return (unit, Some(s));
            }
        }
    }
    (stem, None)
}

/// Groups the files of a directory into units, in byte-wise order of the unit names.
fn group_units(dir: &Path, files: Vec<PathBuf>) -> Result<Vec<Vec<PathBuf>>> {
    let mut units: BTreeMap<Vec<u8>, Vec<(Option<usize>, PathBuf)>> = BTreeMap::new();
    for path in files {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (unit, stage) = unit_of(&name);
        units
            .entry(unit.as_bytes().to_vec())
            .or_default()
            .push((stage, path));
    }
    units
        .into_values()
        .map(|mut parts| {
            parts.sort_by_key(|(s, _)| *s);
            if parts.len() > 1 && parts.iter().any(|(s, _)| s.is_none()) {
                return Err(Error::data(format!(
                    "activations directory {}: {} is a whole unit but other files name stages of the same unit ({})",
                    dir.display(),
                    parts[0].1.display(),
                    parts[1].1.display()
                )));
            }
            if let Some(w) = parts.windows(2).find(|w| w[0].0 == w[1].0) {
                return Err(Error::data(format!("activations directory {}: {} and {} are the same stage of one unit", dir.display(), w[0].1.display(), w[1].1.display())));
            }
            Ok(parts.into_iter().map(|(_, p)| p).collect())
        })
        .collect()
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
    /// Opens `dir`, validates every shard's header against the first unit's and finds
    /// equal-input groups (from the first unit's bytes).
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
        if files.is_empty() {
            return Err(Error::data(format!("activations directory {} holds no *.safetensors files (expected one file per unit)", dir.display())));
        }
        let units = group_units(dir, files)?;
        let first = &units[0];
        let maps: Vec<memmap2::Mmap> = first.iter().map(|p| map_file(p)).collect::<Result<_>>()?;
        let parsed: Vec<SafeTensors> = first
            .iter()
            .zip(&maps)
            .map(|(p, m)| parse(p, 0, m))
            .collect::<Result<_>>()?;
        let mut out_features = BTreeMap::new();
        for (p, m) in first.iter().zip(&maps) {
            let (_, meta) = SafeTensors::read_metadata(m).expect("parsed above");
            out_features.extend(parse_out_features(p, meta.metadata())?);
        }
        // Every tensor of unit 0, with the file it is in.
        let mut names: Vec<(String, usize)> = Vec::new();
        for (f, st) in parsed.iter().enumerate() {
            for n in st.names() {
                if let Some((_, other)) = names.iter().find(|(m, _)| m == n) {
                    return Err(Error::data(format!(
                        "activation shards of unit 0: layer {n} is in both {} and {}",
                        first[*other].display(),
                        first[f].display()
                    )));
                }
                names.push((n.to_string(), f));
            }
        }
        names.sort_by(|a, b| natural_cmp(&a.0, &b.0));
        if names.is_empty() {
            return Err(Error::data(format!(
                "activation shard {} (unit 0) holds no tensors",
                first[0].display()
            )));
        }
        let mut layers = Vec::new();
        // Equal-input groups: same dtype, shape and bytes in the first unit.
        type Content<'a> = (String, Vec<usize>, &'a [u8]);
        let mut by_content: HashMap<Content, Vec<usize>> = HashMap::new();
        for (i, (name, f)) in names.iter().enumerate() {
            let path = &first[*f];
            let view = parsed[*f].tensor(name).expect("name listed by the file");
            check_dtype(path, 0, name, view.dtype())?;
            let [_, d] = view.shape() else {
                return Err(Error::data(format!(
                    "activation shard {} (unit 0), layer {name}: expected a 2-D tensor [tokens, in_features], found shape {:?}",
                    path.display(),
                    view.shape()
                )));
            };
            let out = *out_features.get(name).ok_or_else(|| Error::data(format!("activation shard {} (unit 0): metadata `out_features` has no entry for layer {name}", path.display())))?;
            if *d == 0 || out == 0 {
                return Err(Error::data(format!("activation shard {} (unit 0), layer {name}: in_features = {d} and out_features = {out} must be positive", path.display())));
            }
            layers.push((name.clone(), *d, out));
            // An empty tensor says nothing about later units: it stays alone.
            if view.data().is_empty() {
                by_content.insert((format!("empty:{name}"), Vec::new(), &[]), vec![i]);
            } else {
                by_content
                    .entry((
                        format!("{:?}", view.dtype()),
                        view.shape().to_vec(),
                        view.data(),
                    ))
                    .or_default()
                    .push(i);
            }
        }
        let mut groups: Vec<Vec<usize>> = by_content.into_values().collect();
        groups.sort_by_key(|g| g[0]);
        drop(parsed);
        drop(maps);

        let catalog = Catalog::new(layers, groups);
        let input_names: Vec<String> = catalog
            .inputs
            .iter()
            .map(|i| catalog.layers[i.members[0]].name.clone())
            .collect();
        let mut source = ShardSource {
            units,
            catalog,
            input_names,
            holder: Vec::new(),
        };
        source.holder = (0..source.units.len())
            .map(|u| source.check_header(u))
            .collect::<Result<_>>()?;
        Ok(source)
    }

    /// Checks that a unit has every layer once, 2-D, in a supported dtype and with unit 0's
    /// in_features; returns the file of each unique input.
    fn check_header(&self, unit: usize) -> Result<Vec<usize>> {
        let files = &self.units[unit];
        let mut holder: HashMap<&str, usize> = HashMap::new();
        for (f, path) in files.iter().enumerate() {
            let map = map_file(path)?;
            let st = parse(path, unit, &map)?;
            for layer in &self.catalog.layers {
                let Ok(view) = st.tensor(&layer.name) else {
                    continue;
                };
                if let Some(&other) = holder.get(layer.name.as_str()) {
                    return Err(Error::data(format!(
                        "activation shards of unit {unit}: layer {} is in both {} and {}",
                        layer.name,
                        files[other].display(),
                        path.display()
                    )));
                }
                holder.insert(&layer.name, f);
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
        }
        if let Some(layer) = self
            .catalog
            .layers
            .iter()
            .find(|l| !holder.contains_key(l.name.as_str()))
        {
            return Err(Error::data(format!(
                "activation shard {} (unit {unit}): layer {} is missing (it is in the first unit)",
                files[0].display(),
                layer.name
            )));
        }
        Ok(self
            .input_names
            .iter()
            .map(|n| holder[n.as_str()])
            .collect())
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
        self.units.len()
    }

    fn read(&mut self, units: &[usize], wanted: &[bool], sink: &mut Sink<'_>) -> Result<()> {
        for &unit in units {
            // Only the files that hold a wanted input are opened.
            let files = &self.units[unit];
            let mut maps: Vec<Option<memmap2::Mmap>> = (0..files.len()).map(|_| None).collect();
            for (input, &f) in self.holder[unit].iter().enumerate() {
                if wanted[input] && maps[f].is_none() {
                    maps[f] = Some(map_file(&files[f])?);
                }
            }
            let parsed: Vec<Option<SafeTensors>> = maps
                .iter()
                .zip(files)
                .map(|(m, p)| m.as_ref().map(|m| parse(p, unit, m)).transpose())
                .collect::<Result<_>>()?;
            for (input, name) in self.input_names.iter().enumerate() {
                if !wanted[input] {
                    continue;
                }
                let f = self.holder[unit][input];
                let (path, st) = (&files[f], parsed[f].as_ref().expect("opened above"));
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
                        return Err(Error::data(format!("activation shard {} (unit {unit}), layer {name}: expected shape [tokens, {d}], found {shape:?}", path.display())))
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
                sink(input, Rows::Host(x))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::unit_of;

    #[test]
    fn stage_files_name_their_unit() {
        assert_eq!(
            unit_of("unit-000012.stage-03.safetensors"),
            ("unit-000012", Some(3))
        );
        assert_eq!(unit_of("unit-000012.safetensors"), ("unit-000012", None));
        assert_eq!(unit_of("a.stage-.safetensors"), ("a.stage-", None));
        assert_eq!(unit_of("a.stage-x1.safetensors"), ("a.stage-x1", None));
    }
}
