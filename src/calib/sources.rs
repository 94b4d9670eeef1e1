//! Where calibration samples come from: an `.npz` of ready model inputs, or
//! a folder of images and a file of captions turned into model inputs the
//! way the model's Hugging Face processor would (tokenizer.json and
//! preprocessor_config.json, as an optimum export folder has them).
//!
//! Image preprocessing follows `CLIPImageProcessor`: convert to RGB, resize
//! so the shortest edge is `size` (bicubic), center-crop to `crop_size`,
//! multiply by `rescale_factor`, normalise with `image_mean`/`image_std`,
//! channels first. Keys absent from the file take CLIP's defaults, except
//! the sizes, which follow the model's declared pixel input when it has
//! one. Captions are one per line; they are tokenised with special tokens,
//! truncated to the model's sequence length (its static one, else the
//! tokenizer's truncation length, else 77) and padded to the longest
//! caption of the selection (`attention_mask` marks the real tokens).
//!
//! Selection is deterministic: image files sorted by name pair with lines
//! in order; when there are more pairs than wanted, evenly spaced ones are
//! taken.

use std::path::{Path, PathBuf};

use ndarray::{Array2, Array4, ArrayD};

use super::data::{Array, DataError, Inputs};
use super::npz;
use crate::ir::{Dim, Graph};
use crate::onnx::dtype;

/// Largest captions file, tokenizer or preprocessor config read (a bound
/// for reading, far above real files: CLIP's tokenizer.json is 2 MB).
const TEXT_LIMIT: u64 = 1 << 30;

/// Calibration samples.
#[derive(Debug, Clone)]
pub enum CalibSource {
    /// Arrays named after the model's inputs, axis 0 = sample.
    Npz(PathBuf),
    /// Images and captions.
    Pairs(PairSource),
}

/// A folder of images and a file of captions (one per line).
#[derive(Debug, Clone, Default)]
pub struct PairSource {
    /// Folder of images (PNG or JPEG; other files are ignored).
    pub images: Option<PathBuf>,
    /// Text file with one caption per line.
    pub texts: Option<PathBuf>,
    /// Hugging Face `tokenizer.json` (else `tokenizer.json` in the model's
    /// folder).
    pub tokenizer: Option<PathBuf>,
    /// Hugging Face `preprocessor_config.json` (else the one in the model's
    /// folder, else CLIP's defaults).
    pub preprocessor: Option<PathBuf>,
    /// The model's folder, where an export keeps its tokenizer and
    /// preprocessor files.
    pub model_dir: Option<PathBuf>,
    /// Whether the model is a folder export (pruned as a folder), which
    /// ships its `preprocessor_config.json`: without one (and without
    /// `--preprocessor`) images are refused rather than read with CLIP's
    /// defaults.
    pub folder_export: bool,
}

impl From<PathBuf> for CalibSource {
    fn from(path: PathBuf) -> Self {
        CalibSource::Npz(path)
    }
}

impl From<&Path> for CalibSource {
    fn from(path: &Path) -> Self {
        CalibSource::Npz(path.to_path_buf())
    }
}

impl CalibSource {
    /// A path naming the source in messages.
    pub fn label(&self) -> PathBuf {
        match self {
            CalibSource::Npz(p) => p.clone(),
            CalibSource::Pairs(p) => p.images.clone().or(p.texts.clone()).unwrap_or_default(),
        }
    }

    /// The model inputs of every sample (npz), or of at most `wanted`
    /// samples (images and captions, which are decoded on demand), and the
    /// number of samples.
    pub fn load(&self, graph: &Graph, wanted: usize) -> Result<(Inputs, usize), DataError> {
        match self {
            CalibSource::Npz(path) => npz::read_npz(path, graph),
            CalibSource::Pairs(pairs) => pairs.load(graph, wanted),
        }
    }

    /// The files this source reads: the npz, or the captions, the tokenizer
    /// and preprocessor files (given, or found next to the model), the
    /// image folder and every image in it — exactly what [`Self::load`]
    /// opens. Files that do not exist are left out (reading them fails
    /// later with its own message).
    pub fn files(&self) -> Vec<PathBuf> {
        let pairs = match self {
            CalibSource::Npz(path) => return vec![path.clone()],
            CalibSource::Pairs(pairs) => pairs,
        };
        let mut files = Vec::new();
        if let Some(texts) = &pairs.texts {
            files.push(texts.clone());
            files.extend(pairs.tokenizer_file());
        }
        if let Some(images) = &pairs.images {
            files.push(images.clone());
            files.extend(pairs.preprocessor_file());
            if let Ok(found) = image_files(images) {
                files.extend(found);
            }
        }
        files
    }
}

/// The images of a folder that calibration reads: regular files named
/// `*.png`, `*.jpg` or `*.jpeg` (any case), sorted by name.
fn image_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                    matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg")
                })
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The `CLIPImageProcessor` settings used.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocessing {
    /// Shortest edge after resizing.
    pub shortest_edge: u32,
    /// Crop height and width.
    pub crop: (u32, u32),
    /// Scale applied to 0..255 values.
    pub rescale: f32,
    /// Per-channel mean.
    pub mean: [f32; 3],
    /// Per-channel standard deviation.
    pub std: [f32; 3],
    /// Whether to resize, crop, normalise.
    pub resize: bool,
    /// Whether to center-crop.
    pub center_crop: bool,
    /// Whether to normalise.
    pub normalize: bool,
}

impl Preprocessing {
    /// CLIP's defaults, sized `(h, w)` when the model declares it.
    pub fn clip(size: Option<(u32, u32)>) -> Self {
        let (h, w) = size.unwrap_or((224, 224));
        Self {
            shortest_edge: h.min(w),
            crop: (h, w),
            rescale: 1.0 / 255.0,
            mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            std: [0.268_629_54, 0.261_302_6, 0.275_777_1],
            resize: true,
            center_crop: true,
            normalize: true,
        }
    }

    /// Reads `preprocessor_config.json`; absent keys keep the defaults.
    pub fn read(path: &Path, size: Option<(u32, u32)>) -> Result<Self, String> {
        let text = crate::onnx::read_text(path, TEXT_LIMIT).map_err(|e| e.to_string())?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("not JSON ({e})"))?;
        if !json.is_object() {
            return Err("not a JSON object of preprocessing settings".into());
        }
        let mut p = Self::clip(size);
        let int = |v: &serde_json::Value| {
            v.as_u64()
                .filter(|n| (1..=16384).contains(n))
                .map(|n| n as u32)
        };
        if let Some(size) = json.get("size") {
            p.shortest_edge = int(size)
                .or_else(|| size.get("shortest_edge").and_then(int))
                .or_else(|| size.get("height").and_then(int))
                .ok_or("'size' must be a whole number of pixels from 1 to 16384 (or hold shortest_edge or height)")?;
        }
        if let Some(crop) = json.get("crop_size") {
            p.crop = match int(crop) {
                Some(n) => (n, n),
                None => (
                    crop.get("height")
                        .and_then(int)
                        .ok_or("'crop_size' needs a height from 1 to 16384 pixels")?,
                    crop.get("width")
                        .and_then(int)
                        .ok_or("'crop_size' needs a width from 1 to 16384 pixels")?,
                ),
            };
        }
        if let Some(r) = json.get("rescale_factor") {
            p.rescale = r
                .as_f64()
                .filter(|r| r.is_finite())
                .ok_or("'rescale_factor' is not a number")? as f32;
        }
        let triple = |key: &str| -> Result<Option<[f32; 3]>, String> {
            let Some(v) = json.get(key) else {
                return Ok(None);
            };
            let values: Vec<f32> = v
                .as_array()
                .ok_or(format!("'{key}' is not a list"))?
                .iter()
                .map(|x| x.as_f64().map(|x| x as f32))
                .collect::<Option<Vec<f32>>>()
                .ok_or(format!("'{key}' holds a non-number"))?;
            <[f32; 3]>::try_from(values.as_slice())
                .map(Some)
                .map_err(|_| format!("'{key}' needs 3 values"))
        };
        if let Some(m) = triple("image_mean")? {
            p.mean = m;
        }
        if let Some(s) = triple("image_std")? {
            if s.iter().any(|x| *x == 0.0 || !x.is_finite()) {
                return Err("'image_std' must be finite and non-zero".into());
            }
            p.std = s;
        }
        let flag =
            |key: &str, default: bool| json.get(key).and_then(|v| v.as_bool()).unwrap_or(default);
        p.resize = flag("do_resize", true);
        p.center_crop = flag("do_center_crop", true);
        p.normalize = flag("do_normalize", true);
        if !flag("do_rescale", true) {
            p.rescale = 1.0;
        }
        Ok(p)
    }

    /// One image as `[3, crop_h, crop_w]` values.
    pub fn apply(&self, image: &image::DynamicImage) -> Result<Vec<f32>, String> {
        use image::imageops::FilterType;
        let mut rgb = image.to_rgb8();
        if self.resize {
            let (w, h) = rgb.dimensions();
            let short = w.min(h).max(1) as f64;
            let scale = self.shortest_edge as f64 / short;
            let (nw, nh) = (
                ((w as f64 * scale).round() as u32).max(1),
                ((h as f64 * scale).round() as u32).max(1),
            );
            if (nw, nh) != (w, h) {
                rgb = image::imageops::resize(&rgb, nw, nh, FilterType::CatmullRom);
            }
        }
        let (ch, cw) = self.crop;
        let (w, h) = rgb.dimensions();
        if self.center_crop {
            if w < cw || h < ch {
                // Smaller than the crop: pad with black around the center.
                let mut canvas = image::RgbImage::new(cw.max(w), ch.max(h));
                image::imageops::overlay(
                    &mut canvas,
                    &rgb,
                    ((cw.max(w) - w) / 2) as i64,
                    ((ch.max(h) - h) / 2) as i64,
                );
                rgb = canvas;
            }
            let (w, h) = rgb.dimensions();
            let (x, y) = ((w - cw) / 2, (h - ch) / 2);
            rgb = image::imageops::crop_imm(&rgb, x, y, cw, ch).to_image();
        } else if (w, h) != (cw, ch) {
            return Err(format!(
                "is {w}×{h} after resizing, the model takes {cw}×{ch} (enable do_center_crop)"
            ));
        }
        let (w, h) = rgb.dimensions();
        let mut out = vec![0f32; 3 * (w * h) as usize];
        for (x, y, pixel) in rgb.enumerate_pixels() {
            for c in 0..3 {
                let mut v = pixel[c] as f32 * self.rescale;
                if self.normalize {
                    v = (v - self.mean[c]) / self.std[c];
                }
                out[c * (w * h) as usize + (y * w + x) as usize] = v;
            }
        }
        Ok(out)
    }
}

/// Which model inputs take what.
struct Roles {
    pixels: Option<(String, Option<(u32, u32)>)>,
    ids: Option<(String, i32, Option<usize>)>,
    mask: Option<(String, i32)>,
    /// Integer inputs filled with zeros (token types).
    zeros: Vec<(String, i32)>,
}

fn roles(graph: &Graph) -> Result<Roles, String> {
    let mut roles = Roles {
        pixels: None,
        ids: None,
        mask: None,
        zeros: Vec::new(),
    };
    for input in graph
        .inputs
        .iter()
        .filter(|i| graph.initializer(i.name()).is_none())
    {
        let name = input.name().to_string();
        let t = graph.value_type(&name);
        let elem = t.as_ref().map_or(0, |t| t.elem_type);
        let shape = t.and_then(|t| t.shape).unwrap_or_default();
        let fixed = |axis: usize| match shape.get(axis) {
            Some(Dim::Fixed(n)) if *n > 0 => Some(*n as usize),
            _ => None,
        };
        match elem {
            dtype::code::FLOAT if shape.len() == 4 => {
                let size = fixed(2).zip(fixed(3)).map(|(h, w)| (h as u32, w as u32));
                roles.pixels = Some((name, size));
            }
            dtype::code::INT64 | dtype::code::INT32 => {
                let lower = name.to_ascii_lowercase();
                if lower.contains("mask") {
                    roles.mask = Some((name, elem));
                } else if lower.contains("type") {
                    roles.zeros.push((name, elem));
                } else if roles.ids.is_none() {
                    roles.ids = Some((name, elem, fixed(1)));
                } else {
                    return Err(format!(
                        "input '{name}' is neither token ids, a mask nor token types; use --calib FILE.npz"
                    ));
                }
            }
            _ => {
                return Err(format!(
                    "input '{name}' is not pixels (float, 4-D) or tokens (integer); use --calib FILE.npz"
                ));
            }
        }
    }
    Ok(roles)
}

impl PairSource {
    fn near_model(&self, given: &Option<PathBuf>, name: &str) -> Option<PathBuf> {
        given.clone().or_else(|| {
            self.model_dir
                .as_ref()
                .map(|d| d.join(name))
                .filter(|p| p.is_file())
        })
    }

    /// The tokenizer captions are read with: `--tokenizer`, else
    /// `tokenizer.json` in the model's folder.
    fn tokenizer_file(&self) -> Option<PathBuf> {
        self.near_model(&self.tokenizer, "tokenizer.json")
    }

    /// The preprocessor settings images are read with: `--preprocessor`,
    /// else `preprocessor_config.json` in the model's folder.
    fn preprocessor_file(&self) -> Option<PathBuf> {
        self.near_model(&self.preprocessor, "preprocessor_config.json")
    }

    fn load(&self, graph: &Graph, wanted: usize) -> Result<(Inputs, usize), DataError> {
        let label = |p: &Option<PathBuf>| p.clone().unwrap_or_default();
        let mismatch = |path: PathBuf, reason: String| DataError::Mismatch { path, reason };
        let read = |path: &Path, reason: String| DataError::Read {
            path: path.to_path_buf(),
            reason,
        };
        let roles = roles(graph).map_err(|r| mismatch(label(&self.images), r))?;
        // The files of each side, in order.
        let images: Vec<PathBuf> = match (&roles.pixels, &self.images) {
            (Some(_), Some(dir)) => {
                let files = image_files(dir).map_err(|e| read(dir, e.to_string()))?;
                if files.is_empty() {
                    return Err(read(dir, "holds no .png or .jpg images".into()));
                }
                files
            }
            (Some((name, _)), None) => {
                return Err(mismatch(
                    label(&self.texts),
                    format!("the model takes images ('{name}'); give --images DIR"),
                ));
            }
            (None, _) => Vec::new(),
        };
        let captions: Vec<String> = match (&roles.ids, &self.texts) {
            (Some(_), Some(path)) => {
                let text = crate::onnx::read_text(path, TEXT_LIMIT)
                    .map_err(|e| read(path, e.to_string()))?;
                let lines: Vec<String> = text
                    .lines()
                    .map(|l| l.trim().to_string())
                    .filter(|l| !l.is_empty())
                    .collect();
                if lines.is_empty() {
                    return Err(read(path, "holds no captions".into()));
                }
                lines
            }
            (Some((name, _, _)), None) => {
                return Err(mismatch(
                    label(&self.images),
                    format!("the model takes text ('{name}'); give --texts FILE"),
                ));
            }
            (None, _) => Vec::new(),
        };
        let available = match (images.len(), captions.len()) {
            (0, n) | (n, 0) => n,
            (a, b) if a == b => a,
            (a, b) => {
                // Sample i is image i with caption i: different counts mean
                // the two lists do not line up.
                return Err(mismatch(
                    label(&self.texts),
                    format!(
                        "{b} captions for {a} images in {}; calibration pairs the i-th image (by file name) with the i-th caption line, so the counts must match",
                        label(&self.images).display()
                    ),
                ));
            }
        };
        let n = available.min(wanted.max(1));
        // Evenly spaced over what there is.
        let picks: Vec<usize> = (0..n).map(|i| i * available / n).collect();
        let mut inputs = Inputs::new();
        if let Some((name, size)) = &roles.pixels {
            let dir = self.images.clone().unwrap_or_default();
            let preprocessing = match (self.preprocessor_file(), &self.model_dir) {
                (Some(path), _) => Preprocessing::read(&path, *size).map_err(|r| read(&path, r))?,
                // An export folder ships its preprocessing: without it,
                // CLIP's numbers could normalise the images wrongly.
                (None, Some(folder)) if self.folder_export => {
                    return Err(mismatch(
                        dir,
                        format!(
                            "images need the model's preprocessing, and {} has no preprocessor_config.json: give --preprocessor FILE",
                            folder.display()
                        ),
                    ));
                }
                (None, _) => Preprocessing::clip(*size),
            };
            let (h, w) = preprocessing.crop;
            if let Some((mh, mw)) = size
                && (*mh, *mw) != (h, w)
            {
                return Err(mismatch(
                    dir,
                    format!("the preprocessor crops {h}×{w}, the model takes {mh}×{mw}"),
                ));
            }
            let mut pixels = Array4::<f32>::zeros((n, 3, h as usize, w as usize));
            for (row, &i) in picks.iter().enumerate() {
                let file = &images[i];
                let opened =
                    crate::onnx::open_regular(file).map_err(|e| read(file, e.to_string()))?;
                let image = image::ImageReader::new(std::io::BufReader::new(opened))
                    .with_guessed_format()
                    .map_err(|e| read(file, e.to_string()))?
                    .decode()
                    .map_err(|e| {
                        read(
                            file,
                            format!("not a readable image ({})", image_problem(&e)),
                        )
                    })?;
                let values = preprocessing
                    .apply(&image)
                    .map_err(|r| mismatch(file.clone(), r))?;
                pixels
                    .index_axis_mut(ndarray::Axis(0), row)
                    .as_slice_mut()
                    .expect("standard layout")
                    .copy_from_slice(&values);
            }
            inputs.insert(name.clone(), Array::F32(pixels.into_dyn()));
        }
        if let Some((ids_name, elem, fixed_len)) = &roles.ids {
            let texts = self.texts.clone().unwrap_or_default();
            let path = self.tokenizer_file().ok_or_else(|| {
                mismatch(
                    texts.clone(),
                    match &self.model_dir {
                        Some(dir) => format!(
                            "captions need a tokenizer, and {} has no tokenizer.json: give --tokenizer tokenizer.json",
                            dir.display()
                        ),
                        None => "captions need a tokenizer: give --tokenizer tokenizer.json".into(),
                    },
                )
            })?;
            let json = crate::onnx::read_text(&path, TEXT_LIMIT)
                .map_err(|e| read(&path, e.to_string()))?;
            let tokenizer = json
                .parse::<tokenizers::Tokenizer>()
                .map_err(|e| read(&path, format!("not a Hugging Face tokenizer ({e})")))?;
            let embedding = embedding_sizes(graph, ids_name);
            let limit = fixed_len
                .or_else(|| tokenizer.get_truncation().map(|t| t.max_length))
                .unwrap_or(77);
            // A model with a free sequence axis still has only so many
            // position embeddings: longer captions would not run.
            let limit = embedding.positions.map_or(limit, |p| limit.min(p));
            if limit == 0 {
                return Err(mismatch(
                    path.clone(),
                    "truncates captions to 0 tokens (truncation max_length 0)".into(),
                ));
            }
            let pad = tokenizer
                .get_padding()
                .map(|p| p.pad_id)
                .or_else(|| {
                    ["<|endoftext|>", "[PAD]", "<pad>"]
                        .iter()
                        .find_map(|t| tokenizer.token_to_id(t))
                })
                .unwrap_or(0);
            let mut encoded: Vec<Vec<u32>> = Vec::with_capacity(n);
            for &i in &picks {
                let encoding = tokenizer
                    .encode(captions[i].as_str(), true)
                    .map_err(|e| read(&texts, format!("line {}: {e}", i + 1)))?;
                let mut ids: Vec<u32> = encoding
                    .get_ids()
                    .iter()
                    .zip(encoding.get_attention_mask())
                    .filter(|(_, m)| **m != 0)
                    .map(|(id, _)| *id)
                    .collect();
                if let Some(vocab) = embedding.vocab
                    && let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab)
                {
                    return Err(mismatch(
                        path.clone(),
                        format!(
                            "gives token id {id} for caption line {}, but the model's token embedding has {vocab} rows (a tokenizer for another model?)",
                            i + 1
                        ),
                    ));
                }
                if ids.len() > limit {
                    // Keep the final (end-of-text) token: CLIP pools there.
                    let last = *ids.last().expect("non-empty");
                    ids.truncate(limit);
                    ids[limit - 1] = last;
                }
                encoded.push(ids);
            }
            let len = fixed_len.unwrap_or_else(|| encoded.iter().map(Vec::len).max().unwrap_or(1));
            let mut ids = Array2::<i64>::from_elem((n, len), pad as i64);
            let mut mask = Array2::<i64>::zeros((n, len));
            for (row, tokens) in encoded.iter().enumerate() {
                for (col, &t) in tokens.iter().enumerate() {
                    ids[[row, col]] = t as i64;
                    mask[[row, col]] = 1;
                }
            }
            let typed = |a: Array2<i64>, elem: i32| -> Array {
                let a: ArrayD<i64> = a.into_dyn();
                if elem == dtype::code::INT32 {
                    Array::I32(a.mapv(|v| v as i32))
                } else {
                    Array::I64(a)
                }
            };
            if let Some((name, elem)) = &roles.mask {
                inputs.insert(name.clone(), typed(mask, *elem));
            }
            for (name, elem) in &roles.zeros {
                inputs.insert(name.clone(), typed(Array2::zeros((n, len)), *elem));
            }
            inputs.insert(ids_name.clone(), typed(ids, *elem));
        }
        // Graph input order, as an npz would give them.
        let mut ordered = Inputs::new();
        for input in &graph.inputs {
            if let Some((k, v)) = inputs.shift_remove_entry(input.name()) {
                ordered.insert(k, v);
            }
        }
        Ok((ordered, n))
    }
}

/// The image decoder's error in words. Some decoders put a debug dump of
/// their internal state in the message (a PNG chunk type, say); that says
/// nothing to a user, so it is replaced by what kind of problem it is.
fn image_problem(error: &image::ImageError) -> String {
    let message = error.to_string();
    if !message.contains('{') {
        return message;
    }
    match error {
        image::ImageError::Decoding(_) => "corrupt or truncated image data".into(),
        image::ImageError::Limits(_) => "the image is too large to decode".into(),
        image::ImageError::Unsupported(_) => {
            "an image format or feature that is not supported".into()
        }
        _ => "the image cannot be decoded".into(),
    }
}

/// What the text embedding of a model can take, when it can be read off
/// the graph.
struct EmbeddingSizes {
    /// Rows of the token embedding (the vocabulary size).
    vocab: Option<usize>,
    /// Rows of the position embedding (the longest sequence).
    positions: Option<usize>,
}

/// The token embedding is the `Gather` that reads a 2-D float table at the
/// token ids input; the position embedding is the largest other 2-D float
/// table of the same width that a `Gather` reads (BERT-style models also
/// have a token-type table, with 2 rows).
fn embedding_sizes(graph: &Graph, ids_input: &str) -> EmbeddingSizes {
    let table = |name: &str| {
        graph
            .initializer(name)
            .filter(|t| t.dims().len() == 2 && matches!(t.data_type(), 1 | 10 | 11 | 16))
            .and_then(|t| Some((usize::try_from(t.dims()[0]).ok()?, t.dims()[1])))
    };
    let gathers: Vec<(String, String)> = graph
        .nodes()
        .into_iter()
        .map(|id| graph.node(id))
        .filter(|n| n.op() == "Gather" && n.domain().is_empty() && n.inputs().len() == 2)
        .map(|n| (n.inputs()[0].clone(), n.inputs()[1].clone()))
        .collect();
    // The ids reach the token Gather directly or through reshapes.
    let from_ids = |indices: &str| {
        let mut value = indices.to_string();
        for _ in 0..4 {
            if value == ids_input {
                return true;
            }
            let Some(node) = graph.producer_node(&value).map(|id| graph.node(id)) else {
                return false;
            };
            if !matches!(
                node.op(),
                "Reshape" | "Cast" | "Unsqueeze" | "Squeeze" | "Flatten" | "Identity"
            ) || node.inputs().is_empty()
            {
                return false;
            }
            value = node.inputs()[0].clone();
        }
        value == ids_input
    };
    let Some((token_table, (vocab, width))) = gathers
        .iter()
        .find(|(_, indices)| from_ids(indices))
        .and_then(|(data, _)| Some((data.clone(), table(data)?)))
    else {
        return EmbeddingSizes {
            vocab: None,
            positions: None,
        };
    };
    let positions = gathers
        .iter()
        .filter(|(data, _)| *data != token_table)
        .filter_map(|(data, _)| table(data))
        .filter(|&(_, w)| w == width)
        .map(|(rows, _)| rows)
        .max();
    EmbeddingSizes {
        vocab: Some(vocab),
        positions,
    }
}
