//! `koe say` as a user runs it: the real binary on the committed tiny checkpoint.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-seed0")
}

/// A scratch directory, removed when the returned guard drops.
fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("koe-cli-{name}-"))
        .tempdir()
        .unwrap()
}

/// A voice directory holding `clip` with the fixture's transcript (or none).
fn voice_dir(root: &Path, clip: &[u8], transcript: Option<&str>) -> PathBuf {
    let dir = root.join("voice");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("reference.wav"), clip).unwrap();
    let manifest = serde_json::json!({
        "id": "voice", "display_name": "test", "language": "english",
        "transcript": transcript, "reference": "reference.wav", "mode": "icl",
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    dir
}

fn say(voice: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_koe"))
        .args(["say", "--model"])
        .arg(fixture().join("checkpoint"))
        .arg("--voice")
        .arg(voice)
        .args([
            "--text",
            "Hello there, this is a voice test.",
            "--greedy",
            "--max-frames",
            "23",
        ])
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn say_greedy_equals_the_package_waveform() {
    let tmp = scratch("say");
    let root = tmp.path();
    let clip = std::fs::read(fixture().join("reference.wav")).unwrap();
    let voice = voice_dir(root, &clip, Some("She sells sea shells by the sea shore."));
    let out = root.join("out.wav");
    let run = say(&voice, &out, &[]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("15 frames") && stderr.contains("time to first audio"),
        "{stderr}"
    );

    let ours: Vec<f32> = hound::WavReader::open(&out)
        .unwrap()
        .samples::<i16>()
        .map(|s| s.unwrap() as f32 / 32768.0)
        .collect();
    let fx = candle_core::safetensors::load(fixture().join("fixtures.safetensors"), &candle_core::Device::Cpu).unwrap();
    let reference = fx["icl.wav"].to_vec1::<f32>().unwrap();
    assert_eq!(ours.len(), reference.len(), "sample count");
    let (mut d2, mut r2, mut max_abs) = (0f64, 0f64, 0f64);
    for (a, b) in ours.iter().zip(&reference) {
        let d = (*a as f64 - *b as f64).abs();
        d2 += d * d;
        r2 += (*b as f64).powi(2);
        max_abs = max_abs.max(d);
    }
    let rel = (d2 / r2).sqrt();
    println!("koe say vs icl.wav: rel_l2 {rel:.2e} max_abs {max_abs:.2e} (16-bit output)");
    // The waveform bounds, plus half an int16 step of rounding.
    assert!(rel < 1e-4 && max_abs < 2e-4 + 0.5 / 32768.0, "rel {rel} max {max_abs}");

    // The encoded prompt was cached beside the manifest, and a second run reuses it.
    let cached: Vec<_> = std::fs::read_dir(&voice)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("prompt-"))
        .collect();
    assert_eq!(cached.len(), 1);
    // Decoded frame by frame instead of 4 frames per decoder step (the default after the
    // first frame): the same audio, up to float rounding (at most one int16 step).
    let again = root.join("again.wav");
    assert!(say(&voice, &again, &["--decode-frames", "1"]).status.success());
    let samples = |p: &Path| -> Vec<i16> {
        let mut r = hound::WavReader::open(p).unwrap();
        r.samples::<i16>().map(|s| s.unwrap()).collect()
    };
    let (chunked, single) = (samples(&out), samples(&again));
    assert_eq!(chunked.len(), single.len());
    assert!(chunked.iter().zip(&single).all(|(a, b)| (a - b).abs() <= 1));

    let refused = root.join("refused.wav");
    let run = say(&voice, &refused, &["--decode-frames", "0"]);
    assert!(!run.status.success() && String::from_utf8_lossy(&run.stderr).contains("--decode-frames"));
    assert!(!refused.exists());
}

#[test]
fn say_to_stdout_streams_a_wav() {
    let tmp = scratch("stdout");
    let root = tmp.path();
    let clip = std::fs::read(fixture().join("reference.wav")).unwrap();
    let voice = voice_dir(root, &clip, Some("She sells sea shells by the sea shore."));
    let run = say(&voice, Path::new("-"), &["--x-vector-only"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(&run.stdout[..4], b"RIFF");
    assert!(run.stdout.len() > 44 + 2 * 1920);
}

#[test]
fn bad_voices_fail_clearly_and_write_nothing() {
    let tmp = scratch("bad");
    let root = tmp.path();
    let good = std::fs::read(fixture().join("reference.wav")).unwrap();
    // 0.1 s of 24 kHz int16 silence.
    let mut short = Vec::new();
    {
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 24000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::new(std::io::Cursor::new(&mut short), spec).unwrap();
        for _ in 0..2400 {
            w.write_sample(0i16).unwrap();
        }
        w.finalize().unwrap();
    }
    let cases: Vec<(&str, Vec<u8>, Option<&str>, &str)> = vec![
        (
            "notwav",
            b"this is not audio".to_vec(),
            Some("words"),
            "not a readable WAV",
        ),
        ("short", short, Some("words"), "at least 1 s"),
        ("notranscript", good.clone(), None, "transcript"),
    ];
    for (name, clip, transcript, needle) in cases {
        let tmp = scratch(&format!("bad-{name}"));
        let dir = tmp.path();
        let voice = voice_dir(dir, &clip, transcript);
        let out = dir.join("out.wav");
        let run = say(&voice, &out, &[]);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{name}: should fail");
        assert!(stderr.contains(needle), "{name}: {stderr}");
        assert!(!out.exists(), "{name}: nothing may be written");
    }
    let out = root.join("out.wav");
    let run = Command::new(env!("CARGO_BIN_EXE_koe"))
        .args(["say", "--voices"])
        .arg(root.join("voices"))
        .args(["--voice", "../etc", "--text", "hi", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!run.status.success());
    assert!(
        String::from_utf8_lossy(&run.stderr).contains("voice"),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(!out.exists());
}
