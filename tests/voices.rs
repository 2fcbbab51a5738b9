//! Voice profiles and reference clips: limits, ids, manifests, the default voice, and the
//! prompt cache (key and file).

use candle_core::{DType, Device, Tensor};
use koe::config::{Limits, Settings};
use koe::model::prompt::{IclReference, VoicePrompt};
use koe::voices::{self, load_prompt, load_reference, prompt_cache_key, save_prompt, Voice, VoiceMode, VoiceStore};
use koe::Error;
use std::path::{Path, PathBuf};

const RATE: u32 = 24000;

fn limits() -> Limits {
    Settings::default().limits
}

fn repo_voices() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("voices")
}

/// A 16-bit WAV of `seconds` of a quiet tone.
fn write_clip(path: &Path, sample_rate: u32, channels: u16, seconds: f64) {
    let spec = hound::WavSpec {
        channels,
        sample_rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    let frames = (seconds * sample_rate as f64).round() as usize;
    for i in 0..frames {
        let s = (8000.0 * (i as f64 * 0.05).sin()) as i16;
        for _ in 0..channels {
            w.write_sample(s).unwrap();
        }
    }
    w.finalize().unwrap();
}

/// A voice directory `root/id` with a clip and the given manifest fields.
fn make_voice(root: &Path, id: &str, manifest: serde_json::Value) -> PathBuf {
    let dir = root.join(id);
    std::fs::create_dir_all(&dir).unwrap();
    write_clip(&dir.join("reference.wav"), 16000, 1, 2.0);
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    dir
}

fn manifest(id: &str) -> serde_json::Value {
    serde_json::json!({
        "id": id, "display_name": id, "language": "english",
        "transcript": "Words.", "reference": "reference.wav", "mode": "icl"
    })
}

fn audio_error(r: koe::Result<Vec<f32>>) -> String {
    match r {
        Err(Error::Audio(msg)) => msg,
        other => panic!("expected Error::Audio, got {other:?}"),
    }
}

#[test]
fn reference_clips_outside_the_limits_are_refused_with_their_duration() {
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("clip.wav");

    write_clip(&clip, 24000, 1, 0.0);
    let msg = audio_error(load_reference(&clip, &limits(), RATE));
    assert!(msg.contains("clip.wav") && msg.contains("empty"), "{msg}");

    write_clip(&clip, 24000, 1, 0.1);
    let msg = audio_error(load_reference(&clip, &limits(), RATE));
    assert!(msg.contains("0.10 s") && msg.contains("at least 1 s"), "{msg}");

    write_clip(&clip, 8000, 1, 30.5);
    let msg = audio_error(load_reference(&clip, &limits(), RATE));
    assert!(msg.contains("30.50 s") && msg.contains("at most 30 s"), "{msg}");

    std::fs::write(&clip, b"ID3\x03 an mp3, not a wav").unwrap();
    assert!(audio_error(load_reference(&clip, &limits(), RATE)).contains("not a readable WAV"));
}

#[test]
fn an_8khz_stereo_clip_is_mixed_and_resampled() {
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("phone.wav");
    write_clip(&clip, 8000, 2, 2.5);
    let samples = load_reference(&clip, &limits(), RATE).unwrap();
    assert_eq!(samples.len(), 60000);
    let peak = samples.iter().fold(0f32, |m, s| m.max(s.abs()));
    assert!((peak - 8000.0 / 32768.0).abs() < 0.01, "peak {peak}");
}

#[test]
fn voice_ids_cannot_leave_the_store() {
    let root = tempfile::tempdir().unwrap();
    make_voice(root.path(), "alice", manifest("alice"));
    let store = VoiceStore::open(root.path()).unwrap();
    for id in ["../alice", "..", "a/b", "/etc", "Alice", "", "al ice", "alice\0"] {
        match store.get(id) {
            Err(Error::InvalidRequest(msg)) => assert!(msg.contains("voice id"), "{msg}"),
            other => panic!("{id:?}: expected InvalidRequest, got {other:?}"),
        }
    }
    match store.get("bob") {
        Err(e @ Error::VoiceNotFound { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("\"bob\"") && msg.contains("available: alice"), "{msg}");
        }
        other => panic!("expected VoiceNotFound, got {other:?}"),
    }
    assert_eq!(store.get("alice").unwrap().id(), "alice");
}

#[test]
fn manifests_are_checked() {
    let root = tempfile::tempdir().unwrap();
    let config_error = |dir: &Path| match Voice::from_dir(dir) {
        Err(Error::Config { file, msg }) => {
            assert!(file.ends_with("manifest.json"));
            msg
        }
        other => panic!("expected Error::Config, got {other:?}"),
    };

    let mut m = manifest("quiet");
    m.as_object_mut().unwrap().remove("transcript");
    let msg = config_error(&make_voice(root.path(), "quiet", m.clone()));
    assert!(msg.contains("transcript"), "{msg}");
    m["transcript"] = "  ".into();
    let msg = config_error(&make_voice(root.path(), "quiet", m.clone()));
    assert!(msg.contains("transcript"), "{msg}");

    // The same voice without a transcript is fine as an x-vector voice.
    m["mode"] = "x_vector".into();
    let voice = Voice::from_dir(&make_voice(root.path(), "quiet", m)).unwrap();
    assert_eq!((voice.manifest.mode, voice.transcript()), (VoiceMode::XVector, None));

    let mut m = manifest("escape");
    m["reference"] = "../../secret.wav".into();
    assert!(config_error(&make_voice(root.path(), "escape", m)).contains("file name"));

    let mut m = manifest("typo");
    m["mdoe"] = "icl".into();
    assert!(config_error(&make_voice(root.path(), "typo", m)).contains("mdoe"));

    // In a store, the manifest's id is the directory's name.
    make_voice(root.path(), "renamed", manifest("original"));
    let store = VoiceStore::open(root.path()).unwrap();
    match store.get("renamed") {
        Err(Error::Config { msg, .. }) => assert!(msg.contains("differs"), "{msg}"),
        other => panic!("expected Error::Config, got {other:?}"),
    }
    assert!(VoiceStore::open(&root.path().join("nowhere")).is_err());
}

#[test]
fn the_default_voice_loads() {
    let store = VoiceStore::open(&repo_voices()).unwrap();
    let ids: Vec<String> = store.list().unwrap().iter().map(|v| v.id().to_string()).collect();
    assert!(ids.contains(&"default".to_string()), "{ids:?}");

    let voice = store.get("default").unwrap();
    assert_eq!(voice.manifest.mode, VoiceMode::Icl);
    assert_eq!(voice.manifest.language, "english");
    assert!(voice.transcript().unwrap().starts_with("The morning light"));
    let samples = voice.load_reference(&limits(), RATE).unwrap();
    let seconds = samples.len() as f64 / RATE as f64;
    assert!((5.0..=8.0).contains(&seconds), "{seconds} s");

    // `--voice` takes an id or a directory.
    assert_eq!(store.resolve("default").unwrap().dir, voice.dir);
    let by_path = store.resolve(repo_voices().join("default").to_str().unwrap()).unwrap();
    assert_eq!(by_path.id(), "default");
    assert!(matches!(
        store.resolve("no-such-voice"),
        Err(Error::VoiceNotFound { .. })
    ));
}

#[test]
fn the_prompt_cache_key_follows_everything_the_prompt_depends_on() {
    let key =
        |model: &str, clip: &[u8], transcript: Option<&str>, mode| prompt_cache_key(model, clip, transcript, mode);
    let base = key("qwen@1", b"clip", Some("Hello."), VoiceMode::Icl);
    assert_eq!(base.len(), 32);
    assert!(base.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(base, key("qwen@1", b"clip", Some("Hello."), VoiceMode::Icl));
    for other in [
        key("qwen@2", b"clip", Some("Hello."), VoiceMode::Icl),
        key("qwen@1", b"clip2", Some("Hello."), VoiceMode::Icl),
        key("qwen@1", b"clip", Some("Hello!"), VoiceMode::Icl),
        key("qwen@1", b"clip", Some("Hello."), VoiceMode::XVector),
        // Fields are delimited: moving bytes between them changes the key.
        key("qwen@1c", b"lip", Some("Hello."), VoiceMode::Icl),
    ] {
        assert_ne!(base, other);
    }

    // On a voice: the file beside the manifest, and a new name when the clip changes.
    let root = tempfile::tempdir().unwrap();
    let dir = make_voice(root.path(), "carol", manifest("carol"));
    let voice = Voice::from_dir(&dir).unwrap();
    let path = voice.prompt_cache_path("qwen@1").unwrap();
    assert_eq!(path.parent(), Some(dir.as_path()));
    let name = path.file_name().unwrap().to_str().unwrap();
    assert!(name.starts_with("prompt-") && name.ends_with(".safetensors"), "{name}");
    assert_eq!(voice.prompt_cache_path("qwen@1").unwrap(), path);
    write_clip(&voice.reference_path(), 16000, 1, 2.5);
    assert_ne!(voice.prompt_cache_path("qwen@1").unwrap(), path);
}

#[test]
fn cached_prompts_round_trip() -> candle_core::Result<()> {
    let dir = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let speaker_embedding = Tensor::arange(0f32, 8.0, &dev)?;
    let codes = Tensor::arange(0u32, 5 * 16, &dev)?.reshape((5, 16))?;
    let icl = VoicePrompt {
        speaker_embedding: speaker_embedding.clone(),
        icl: Some(IclReference {
            codes: codes.clone(),
            text_ids: vec![151644, 77091, 198, 9],
        }),
    };
    let path = dir.path().join("prompt-icl.safetensors");
    save_prompt(&icl, &path).unwrap();
    let back = load_prompt(&path, &dev).unwrap();
    assert_eq!(
        back.speaker_embedding.to_vec1::<f32>()?,
        speaker_embedding.to_vec1::<f32>()?
    );
    let back_icl = back.icl.unwrap();
    assert_eq!(back_icl.codes.dtype(), DType::U32);
    assert_eq!(back_icl.codes.to_vec2::<u32>()?, codes.to_vec2::<u32>()?);
    assert_eq!(back_icl.text_ids, [151644, 77091, 198, 9]);

    let x_vector = VoicePrompt {
        speaker_embedding: speaker_embedding.clone(),
        icl: None,
    };
    let path = dir.path().join("prompt-xvec.safetensors");
    save_prompt(&x_vector, &path).unwrap();
    assert!(load_prompt(&path, &dev).unwrap().icl.is_none());
    // Only the two prompt files: no temporary files left beside them.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);

    // A file with the wrong shapes is an error naming it, not a panic later.
    let bad = dir.path().join("prompt-bad.safetensors");
    let tensors = std::collections::HashMap::from([("speaker_embedding", codes)]);
    candle_core::safetensors::save(&tensors, &bad)?;
    match load_prompt(&bad, &dev) {
        Err(Error::Config { file, msg }) => assert!(file == bad && msg.contains("speaker_embedding"), "{msg}"),
        other => panic!("expected Error::Config, got {other:?}"),
    }
    assert!(voices::validate_id("ok_id-2").is_ok());
    Ok(())
}
