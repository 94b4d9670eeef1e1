//! The bodies of the fuzz targets, shared by `fuzz/fuzz_targets/*.rs` and by
//! the corpus replay test `tests/fuzz_corpus.rs` (both include this file as a
//! module with `#[path]`), so the replay test runs exactly what the fuzzer
//! runs.
//!
//! Every body takes raw fuzzer bytes. Errors from the library are expected
//! and ignored; a panic (including a failed property assertion below) is a
//! bug. Only the main crate, `bytes`, `prost` and `tempfile` are used, so the
//! file compiles both in the fuzz crate and as part of the main crate's
//! tests.

// Each fuzz target uses only one of the bodies.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use bytes::Bytes;
use onnx_idprune::arch;
use onnx_idprune::ir::Model;
use onnx_idprune::onnx::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, SparseTensorProto,
    StringStringEntryProto, TensorProto, ValueInfoProto,
};
use onnx_idprune::onnx::{self, dtype};
use onnx_idprune::plan::Plan;
use prost::Message;

/// A fuzz target's body.
pub type Body = fn(&[u8]);

/// The fuzz targets, by name: the folder names under `fuzz/corpus/`.
pub const TARGETS: &[(&str, Body)] = &[
    ("load_model", load_model),
    ("parse_plan", parse_plan),
    ("load_with_external", load_with_external),
];

/// A label in a folder that does not exist: nothing can be resolved next to
/// it, so any file access the loader might attempt fails cleanly.
const LABEL: &str = "/nonexistent-onnx-idprune-fuzz/model.onnx";

/// `load_model`: bytes → `load_bytes` → IR → `check` → `discover`.
///
/// Properties beyond "no panic" (see `analyse`): a loaded tensor's payload
/// fits its dims; an IR that builds passes its own invariant check and
/// converts back to the proto it came from (up to node order); the model
/// writer's bytes decode to that same proto; a discovered
/// tower numbers its blocks 0, 1, 2, ….
pub fn load_model(data: &[u8]) {
    let Ok(loaded) = onnx::load_bytes(Bytes::copy_from_slice(data), Path::new(LABEL)) else {
        return;
    };
    analyse(loaded.proto);
}

/// IR build, invariant check, round trips and discovery.
fn analyse(proto: ModelProto) {
    for_each_tensor(&proto, &mut |t| check_payload(t));
    // Duplicate value_info names are kept once by design (a map by name).
    let original = value_info_unique(&proto).then(|| proto.clone());
    let Ok(model) = Model::from_proto(proto) else {
        return;
    };
    // Rebuilds the graph from its own `to_proto`, so this also checks that
    // the converted graph builds again.
    if let Err(e) = model.graph.check() {
        panic!("a graph that built fails its own invariant check: {e}");
    }

    // "An unedited model gives back the proto it was built from" (nodes
    // possibly reordered into a topological order).
    let back = model.to_proto();
    if let Some(original) = original {
        assert!(
            original == back || canonical(&original) == canonical(&back),
            "Model::to_proto of an unedited model differs from the proto it was built from"
        );
    }

    // The model writer's bytes decode to the same model.
    let encoded = onnx::encode_to_vec(&back);
    let reloaded = match onnx::load_bytes(Bytes::from(encoded), Path::new(LABEL)) {
        Ok(reloaded) => reloaded.proto,
        Err(e) => panic!("a model re-encoded from a valid IR does not load: {e}"),
    };
    assert!(
        reloaded == back || reloaded.encode_to_vec() == back.encode_to_vec(),
        "onnx::encode_to_vec output decodes to a different model"
    );

    if let Ok(found) = arch::discover(&model.graph) {
        for tower in &found.towers {
            for (i, block) in tower.blocks.iter().enumerate() {
                assert_eq!(
                    block.index,
                    i,
                    "{} tower: block numbering",
                    tower.kind.name()
                );
            }
        }
        let _ = found.to_json().to_string();
    }
}

/// A model's protobuf encoding with the main graph's nodes as a sorted list
/// of encodings: a comparison key where node order does not matter and NaN
/// payloads compare by their bits (`==` on protos says NaN != NaN).
fn canonical(proto: &ModelProto) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut proto = proto.clone();
    let mut nodes = Vec::new();
    if let Some(graph) = &mut proto.graph {
        nodes = graph.node.drain(..).map(|n| n.encode_to_vec()).collect();
        nodes.sort();
    }
    (proto.encode_to_vec(), nodes)
}

fn value_info_unique(proto: &ModelProto) -> bool {
    let Some(graph) = &proto.graph else {
        return true;
    };
    let mut seen = std::collections::HashSet::new();
    graph.value_info.iter().all(|v| seen.insert(v.name()))
}

/// The loader's promise (src/onnx/load.rs): "every tensor's payload size is
/// checked against its dims and element type, so later stages can trust
/// `dims` when they allocate". Checked here independently, in 128-bit
/// arithmetic, for the tensors `for_each_tensor` visits.
fn check_payload(t: &TensorProto) {
    if t.segment.is_some() {
        return; // a chunk: dims describe the whole tensor
    }
    let (Some(raw), Some(bits)) = (&t.raw_data, dtype::bits(t.data_type())) else {
        return;
    };
    let needed = t
        .dims
        .iter()
        .try_fold(u128::from(bits), |acc, &d| {
            u128::try_from(d).ok().and_then(|d| acc.checked_mul(d))
        })
        .map(|b| b.div_ceil(8));
    assert_eq!(
        needed,
        Some(raw.len() as u128),
        "tensor '{}' loaded with dims {:?} of {} but {} payload bytes",
        t.name(),
        t.dims,
        dtype::name(t.data_type()),
        raw.len()
    );
}

/// `parse_plan`: bytes → (UTF-8) `Plan::parse` → `validate` → `normalized`
/// → `to_json` → parse again.
///
/// Properties: an accepted plan validates, normalizing is idempotent and
/// keeps it valid, its canonical JSON parses back to the normalized plan,
/// and the canonical JSON of that is the same text.
pub fn parse_plan(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(plan) = Plan::parse(text) else {
        return;
    };
    if let Err(e) = plan.validate() {
        panic!("Plan::parse accepted a plan that fails validate: {e}");
    }
    let normalized = plan.normalized();
    if let Err(e) = normalized.validate() {
        panic!("normalizing made a valid plan invalid: {e}");
    }
    assert_eq!(
        normalized.normalized(),
        normalized,
        "normalized is not idempotent"
    );
    assert_eq!(normalized.blocks.len(), plan.blocks.len());
    let json = plan.to_json();
    let again = match Plan::parse(&json) {
        Ok(again) => again,
        Err(e) => panic!("canonical JSON does not parse back: {e}\n{json}"),
    };
    assert_eq!(again, normalized, "round trip changed the plan\n{json}");
    assert_eq!(again.to_json(), json, "canonical JSON is not stable");
}

/// A cursor over fuzzer bytes. Reading past the end gives zeros, so every
/// input decodes to some case.
struct Input<'a> {
    data: &'a [u8],
}

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn u64(&mut self) -> u64 {
        (0..8).fold(0, |acc, _| (acc << 8) | u64::from(self.byte()))
    }

    fn below(&mut self, n: usize) -> usize {
        usize::from(self.byte()) % n
    }

    fn text(&mut self, max: usize) -> String {
        let len = self.below(max + 1);
        let bytes: Vec<u8> = (0..len).map(|_| self.byte()).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Length of `w.bin`, the external data file every case has.
const DATA_LEN_MAX: usize = 4096;

/// Names under which a tensor may look for its external data. The folder
/// holding the model also has `w.bin`, `sub/w.bin`, a folder `sub`, a link
/// `out.bin` to a file outside the folder and a link `up` to the parent
/// folder.
const LOCATIONS: &[&str] = &[
    "w.bin",
    "./w.bin",
    "sub/w.bin",
    "sub/./w.bin",
    "sub//w.bin",
    "model.onnx",
    "missing.bin",
    "sub",
    ".",
    "",
    "../w.bin",
    "sub/../w.bin",
    "../outside.bin",
    "/etc/hostname",
    "out.bin",
    "up/outside.bin",
    "up/model/w.bin",
    "w.bin\0.txt",
    "w.bin/",
    "W.BIN",
];

/// `load_with_external`: builds a small model whose tensors keep their data
/// in files next to it, from a structured reading of the bytes, writes it to
/// a temporary folder and loads it with `onnx::load`. An input starting with
/// 0xFF is instead written verbatim as the model file (the same folder layout
/// around it), so raw protobuf mutations reach the resolver too.
///
/// Properties when the load succeeds: every external data file it reports
/// lies inside the model's folder, and each tensor's payload is exactly the
/// claimed byte range of the file its location names.
pub fn load_with_external(data: &[u8]) {
    let Ok(root) = tempfile::Builder::new().prefix("idprune-fuzz-").tempdir() else {
        return;
    };
    let folder = root.path().join("model");
    let mut input = Input { data };
    let raw_mode = data.first() == Some(&0xFF);
    let data_len = if raw_mode {
        64
    } else {
        (usize::from(input.byte()) << 8 | usize::from(input.byte())) % (DATA_LEN_MAX + 1)
    };
    if make_folder(&folder, root.path(), data_len).is_err() {
        return;
    }
    let model_path = folder.join("model.onnx");
    let cases = if raw_mode {
        if std::fs::write(&model_path, &data[1..]).is_err() {
            return;
        }
        Vec::new()
    } else {
        let (proto, cases) = external_model(&mut input, data_len);
        if std::fs::write(&model_path, onnx::encode_to_vec(&proto)).is_err() {
            return;
        }
        cases
    };

    let Ok(loaded) = onnx::load(&model_path) else {
        return;
    };
    let canonical_folder = std::fs::canonicalize(&folder).expect("the folder exists");
    for file in &loaded.external_files {
        assert!(
            file.starts_with(&canonical_folder),
            "external data file {} is outside the model's folder {}",
            file.display(),
            canonical_folder.display()
        );
    }
    let mut payloads = std::collections::HashMap::new();
    for_each_tensor(&loaded.proto, &mut |t| {
        payloads.insert(t.name().to_string(), t.raw_data.clone());
    });
    for case in &cases {
        let Some(raw) = payloads.get(&case.name) else {
            panic!("tensor '{}' is missing after loading", case.name);
        };
        if !case.external {
            continue;
        }
        let raw = raw.as_ref().unwrap_or_else(|| {
            panic!(
                "external tensor '{}' has no payload after loading",
                case.name
            )
        });
        let target = std::fs::canonicalize(folder.join(&case.location))
            .unwrap_or_else(|e| panic!("'{}' loaded but does not resolve: {e}", case.location));
        assert!(target.starts_with(&canonical_folder));
        let file = std::fs::read(&target).expect("the data file is readable");
        let start = usize::try_from(case.offset).expect("offset fits the file");
        assert!(start <= file.len(), "offset {start} is past the end");
        let end = match case.length {
            Some(len) => usize::try_from(len)
                .ok()
                .and_then(|len| start.checked_add(len))
                .expect("offset + length fits the file"),
            None => file.len(),
        };
        assert!(end <= file.len(), "bytes {start}..{end} are past the end");
        assert_eq!(
            &raw[..],
            &file[start..end],
            "tensor '{}': payload is not bytes {start}..{end} of '{}'",
            case.name,
            case.location
        );
        if let Some(want) = case.elements().and_then(|n| dtype::raw_len(case.dtype, n)) {
            assert_eq!(
                raw.len() as u64,
                want,
                "tensor '{}': payload size",
                case.name
            );
        }
    }
    analyse(loaded.proto);
}

/// Lays out the model's folder: `w.bin` (`data_len` bytes), `sub/w.bin`,
/// links to the outside, and `outside.bin` next to the folder.
fn make_folder(folder: &Path, root: &Path, data_len: usize) -> std::io::Result<()> {
    std::fs::create_dir_all(folder.join("sub"))?;
    let pattern = |len: usize, salt: u8| -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt))
            .collect()
    };
    std::fs::write(folder.join("w.bin"), pattern(data_len, 1))?;
    std::fs::write(folder.join("sub").join("w.bin"), pattern(data_len / 2, 2))?;
    std::fs::write(root.join("outside.bin"), pattern(256, 3))?;
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(root.join("outside.bin"), folder.join("out.bin"))?;
        std::os::unix::fs::symlink(root, folder.join("up"))?;
    }
    Ok(())
}

/// What one generated tensor claims.
struct Claim {
    name: String,
    external: bool,
    location: String,
    offset: u64,
    length: Option<u64>,
    dtype: i32,
    dims: Vec<i64>,
}

impl Claim {
    fn elements(&self) -> Option<u64> {
        self.dims.iter().try_fold(1u64, |acc, &d| {
            u64::try_from(d).ok().and_then(|d| acc.checked_mul(d))
        })
    }
}

/// Text of an offset or length: interesting edges, any u64, or not a
/// number at all.
fn number(input: &mut Input, data_len: usize, needed: Option<u64>) -> String {
    let data_len = data_len as u64;
    let n = match input.below(14) {
        0 => 0,
        1 => u64::from(input.byte()),
        2 => data_len,
        3 => data_len + 1,
        4 => data_len.saturating_sub(1),
        5 => needed.unwrap_or(4),
        6 => needed.unwrap_or(4).saturating_sub(1),
        7 => u64::MAX,
        8 => u64::MAX - u64::from(input.byte()),
        9 => 1 << 62,
        10 => input.u64(),
        11 => return "-1".into(),
        12 => return "18446744073709551616".into(),
        _ => return input.text(8),
    };
    n.to_string()
}

/// Builds a model with 1 to 3 tensors, each an initializer, a `Constant`
/// node's value or a sparse initializer's values, most of them external.
fn external_model(input: &mut Input, data_len: usize) -> (ModelProto, Vec<Claim>) {
    let count = 1 + input.below(3);
    let mut graph = GraphProto {
        name: Some("g".into()),
        ..Default::default()
    };
    let mut claims = Vec::new();
    for i in 0..count {
        let name = format!("t{i}");
        let dtype = [1, 7, 10, 2, 22, 26, 8, 0, 11, 16][input.below(10)];
        let rank = input.below(4);
        let dims: Vec<i64> = (0..rank)
            .map(|_| match input.below(8) {
                0 => 0,
                1 => 1,
                2 => 2,
                3 => 3,
                4 => 17,
                5 => -1,
                6 => i64::MAX,
                _ => input.u64() as i64,
            })
            .collect();
        let mut tensor = TensorProto {
            name: Some(name.clone()),
            data_type: Some(dtype),
            dims: dims.clone(),
            ..Default::default()
        };
        let needed = tensor
            .dims
            .iter()
            .try_fold(1u64, |acc, &d| {
                u64::try_from(d).ok().and_then(|d| acc.checked_mul(d))
            })
            .and_then(|n| dtype::raw_len(dtype, n));
        let flags = input.byte();
        let external = flags & 0x7 != 0;
        let mut claim = Claim {
            name: name.clone(),
            external,
            location: String::new(),
            offset: 0,
            length: None,
            dtype,
            dims,
        };
        if external {
            tensor.data_location = Some(1);
            let location = if flags & 0x8 != 0 {
                input.text(12)
            } else {
                LOCATIONS[input.below(LOCATIONS.len())].to_string()
            };
            let mut entries = Vec::new();
            if flags & 0x10 == 0 {
                entries.push(("location".to_string(), location.clone()));
            }
            claim.location = location;
            if flags & 0x20 != 0 {
                let text = number(input, data_len, needed);
                claim.offset = text.parse().unwrap_or(0);
                entries.push(("offset".into(), text));
            }
            if flags & 0x40 != 0 {
                let text = number(input, data_len, needed);
                claim.length = text.parse().ok();
                entries.push(("length".into(), text));
            }
            if flags & 0x80 != 0 {
                // A second location entry, or a key the loader ignores.
                let key = if input.byte() & 1 == 0 {
                    "location"
                } else {
                    "checksum"
                };
                let value = input.text(16);
                if key == "location" {
                    // The last entry of a key is the one the loader uses.
                    claim.location.clone_from(&value);
                }
                entries.push((key.into(), value));
            }
            tensor.external_data = entries
                .into_iter()
                .map(|(key, value)| StringStringEntryProto {
                    key: Some(key),
                    value: Some(value),
                })
                .collect();
        } else {
            let len = input.below(64);
            tensor.raw_data = Some(Bytes::from(vec![0u8; len]));
        }
        match input.below(3) {
            0 => graph.initializer.push(tensor),
            1 => graph.node.push(NodeProto {
                op_type: Some("Constant".into()),
                output: vec![format!("c{i}")],
                attribute: vec![AttributeProto {
                    name: Some("value".into()),
                    r#type: Some(4),
                    t: Some(tensor),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            _ => graph.sparse_initializer.push(SparseTensorProto {
                values: Some(tensor),
                indices: None,
                dims: vec![4],
            }),
        }
        claims.push(claim);
    }
    graph.output = graph
        .node
        .iter()
        .flat_map(|n| n.output.clone())
        .map(|name| ValueInfoProto {
            name: Some(name),
            ..Default::default()
        })
        .collect();
    let model = ModelProto {
        ir_version: Some(10),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(graph),
        ..Default::default()
    };
    (model, claims)
}

/// Calls `f` on the main graph's initializers, tensor attributes (such as
/// `Constant` values) and sparse initializer values: the tensors
/// `load_with_external` generates and the ones discovery reads.
fn for_each_tensor(model: &ModelProto, f: &mut dyn FnMut(&TensorProto)) {
    let Some(graph) = &model.graph else { return };
    for t in &graph.initializer {
        f(t);
    }
    for node in &graph.node {
        for a in &node.attribute {
            a.t.iter().chain(&a.tensors).for_each(&mut *f);
        }
    }
    for s in &graph.sparse_initializer {
        if let Some(t) = &s.values {
            f(t);
        }
    }
}

/// Every file under `dir` (recursively), sorted, skipping hidden files
/// (libFuzzer's `.tmp` leftovers, `.gitkeep`).
pub fn corpus_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}
