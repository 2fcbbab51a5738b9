//! Shared machinery of the parity test: fixture discovery, tensor access, comparison with the
//! kit's tolerances, and the bookkeeping of which fixture tensors were checked.

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Tolerance classes of `../shared/parity/README.md` ("How a Rust test should compare").
#[derive(Clone, Copy, Debug)]
pub enum Tol {
    /// `spk.mels`: log domain near the 1e-5 clamp.
    Mel,
    /// `spk.*`, `enc.*`.
    Encoder,
    /// `prefill_embeds`, `trailing_text`, `step_embeds`, `tts_pad_embed`, `cp_prefill_embeds`
    /// row 1 (the embedding of code 0; its row 0 is a talker hidden state).
    Prompt,
    /// `*_layers`, `*_hidden`, `*logits*`.
    Talker,
    /// `decoder.quantized` … `decoder.block0`.
    Decoder,
    /// `decoder.whole`, `decoder.short.*`, `*.wav`, streaming decodes.
    Wave,
}

impl Tol {
    /// (relative L2 bound, max abs bound)
    pub fn bounds(self) -> (f64, f64) {
        match self {
            Tol::Mel => (1e-5, 1e-3),
            Tol::Encoder => (1e-5, 1e-4),
            Tol::Prompt => (1e-6, 1e-5),
            Tol::Talker => (1e-5, 1e-4),
            Tol::Decoder => (1e-5, 1e-4),
            Tol::Wave => (1e-4, 2e-4),
        }
    }
}

/// One fixture directory made by `../shared/parity/make_fixtures.py`.
pub struct Fixture {
    pub dir: PathBuf,
    pub name: String,
    pub json: Value,
    tensors: HashMap<String, Tensor>,
    /// Names of fixture tensors that a check compared or consumed as an input.
    used: RefCell<BTreeSet<String>>,
    failures: RefCell<Vec<String>>,
}

impl Fixture {
    pub fn load(dir: &Path) -> Fixture {
        let json_path = dir.join("fixtures.json");
        let text =
            std::fs::read_to_string(&json_path).unwrap_or_else(|e| panic!("cannot read {}: {e}", json_path.display()));
        let json: Value = serde_json::from_str(&text).expect("fixtures.json is not JSON");
        let tensors = candle_core::safetensors::load(dir.join("fixtures.safetensors"), &Device::Cpu)
            .expect("cannot load fixtures.safetensors");
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Fixture {
            dir: dir.to_path_buf(),
            name,
            json,
            tensors,
            used: RefCell::new(BTreeSet::new()),
            failures: RefCell::new(Vec::new()),
        }
    }

    pub fn checkpoint(&self) -> PathBuf {
        self.dir.join(self.json["checkpoint"].as_str().unwrap_or("checkpoint"))
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// A fixture tensor, marked as used (an input or a reference).
    pub fn tensor(&self, name: &str) -> Tensor {
        self.used.borrow_mut().insert(name.to_string());
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("{}: fixture has no tensor {name}", self.name))
            .clone()
    }

    pub fn ints(&self, name: &str) -> Vec<i64> {
        self.tensor(name).flatten_all().unwrap().to_vec1::<i64>().unwrap()
    }

    pub fn ints2(&self, name: &str) -> Vec<Vec<i64>> {
        self.tensor(name).to_vec2::<i64>().unwrap()
    }

    pub fn floats(&self, name: &str) -> Vec<f32> {
        self.tensor(name).flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// Compares a float tensor with the fixture's, prints one report line, records a failure.
    pub fn compare(&self, name: &str, ours: &Tensor, tol: Tol) {
        let reference = self.tensor(name);
        self.compare_to(name, ours, &reference, tol);
    }

    /// Like `compare`, against a given reference (e.g. a streaming decode vs `decoder.whole`).
    pub fn compare_to(&self, label: &str, ours: &Tensor, reference: &Tensor, tol: Tol) {
        self.compare_slices(label, &host_f32(ours), &host_f32(reference), tol);
    }

    pub fn compare_slices(&self, label: &str, ours: &[f32], reference: &[f32], tol: Tol) {
        let (rel_bound, abs_bound) = tol.bounds();
        if ours.len() != reference.len() {
            self.fail(format!(
                "{label}: length {} != reference {}",
                ours.len(),
                reference.len()
            ));
            return;
        }
        let mut diff2 = 0f64;
        let mut ref2 = 0f64;
        let mut max_abs = 0f64;
        let mut finite = true;
        for (&a, &b) in ours.iter().zip(reference) {
            finite &= a.is_finite();
            let d = (a as f64 - b as f64).abs();
            diff2 += d * d;
            ref2 += (b as f64) * (b as f64);
            max_abs = max_abs.max(d);
        }
        let rel = diff2.sqrt() / ref2.sqrt().max(1e-30);
        let ok = finite && rel <= rel_bound && max_abs <= abs_bound;
        println!(
            "{:<14} {:<34} rel_l2 {rel:.2e}  max_abs {max_abs:.2e}  bound {rel_bound:.0e}/{abs_bound:.0e}  {}",
            self.name,
            label,
            if ok { "ok" } else { "FAIL" }
        );
        if !ok {
            self.fail(format!(
                "{label}: rel_l2 {rel:.3e} max_abs {max_abs:.3e} finite {finite}"
            ));
        }
    }

    /// Integers must be identical.
    pub fn compare_ints(&self, label: &str, ours: &[i64], reference: &[i64]) {
        let ok = ours == reference;
        println!(
            "{:<14} {:<34} {} integers  {}",
            self.name,
            label,
            reference.len(),
            if ok { "identical" } else { "FAIL" }
        );
        if !ok {
            let first = ours.iter().zip(reference).position(|(a, b)| a != b);
            self.fail(format!(
                "{label}: integers differ (len {} vs {}, first difference at {first:?})\n  ours {ours:?}\n  ref  {reference:?}",
                ours.len(),
                reference.len()
            ));
        }
    }

    pub fn fail(&self, msg: String) {
        println!("{:<14} FAIL {msg}", self.name);
        self.failures.borrow_mut().push(msg);
    }

    pub fn failures(&self) -> Vec<String> {
        self.failures.borrow().clone()
    }

    /// Names listed in fixtures.json that no check used.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.borrow();
        self.json["tensors"]
            .as_object()
            .map(|t| t.keys().filter(|k| !used.contains(*k)).cloned().collect())
            .unwrap_or_default()
    }

    /// Case names in fixtures.json order.
    pub fn cases(&self) -> Vec<String> {
        self.json["cases"]
            .as_object()
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default()
    }

    pub fn case(&self, case: &str) -> &Value {
        &self.json["cases"][case]
    }
}

/// The committed fixtures (`tests/fixtures/*`, `tiny-seed0` first: the copy of the kit's own)
/// plus every directory in `KOE_PARITY_DIRS` (`:`-separated).
pub fn fixture_dirs() -> Vec<PathBuf> {
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&committed)
        .expect("tests/fixtures")
        .map(|entry| entry.expect("an entry of tests/fixtures").path())
        .filter(|path| path.is_dir())
        .collect();
    dirs.sort_by_key(|d| (!d.ends_with("tiny-seed0"), d.clone()));
    if let Ok(extra) = std::env::var("KOE_PARITY_DIRS") {
        dirs.extend(extra.split(':').filter(|s| !s.is_empty()).map(PathBuf::from));
    }
    dirs
}

/// A tensor's values as f32 on the host, flattened.
pub fn host_f32(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}
