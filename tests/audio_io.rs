//! WAV reading and writing, the streaming encoders, and the resampler (against librosa).

use koe::audio::resample::resample;
use koe::audio::wav::{encode_f32_le, encode_pcm16_le, read_wav, read_wav_bytes, streaming_header, WavSink};
use koe::Error;
use std::path::Path;

fn write_wav<S: hound::Sample + Copy>(path: &Path, spec: hound::WavSpec, interleaved: &[S]) {
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for &s in interleaved {
        w.write_sample(s).unwrap();
    }
    w.finalize().unwrap();
}

fn spec(channels: u16, sample_rate: u32, bits: u16, format: hound::SampleFormat) -> hound::WavSpec {
    hound::WavSpec {
        channels,
        sample_rate,
        bits_per_sample: bits,
        sample_format: format,
    }
}

fn audio_error(r: koe::Result<impl std::fmt::Debug>) -> String {
    match r {
        Err(Error::Audio(msg)) => msg,
        other => panic!("expected Error::Audio, got {other:?}"),
    }
}

#[test]
fn a_non_wav_file_is_a_clear_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.wav");
    std::fs::write(&path, "these are not samples").unwrap();
    let msg = audio_error(read_wav(&path));
    assert!(msg.contains("notes.wav") && msg.contains("not a readable WAV"), "{msg}");

    // A RIFF/WAVE header cut off before its format chunk.
    let msg = audio_error(read_wav_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt ", "upload"));
    assert!(msg.starts_with("upload: not a readable WAV"), "{msg}");

    match read_wav(&dir.path().join("missing.wav")) {
        Err(Error::Io { path, .. }) => assert!(path.ends_with("missing.wav")),
        other => panic!("expected Error::Io, got {other:?}"),
    }
}

#[test]
fn integer_wavs_of_every_width_read_as_scaled_mono() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clip.wav");
    use hound::SampleFormat::Int;

    write_wav(&path, spec(1, 16000, 8, Int), &[-128i8, 0, 64, 127]);
    let audio = read_wav(&path).unwrap();
    assert_eq!(audio.sample_rate, 16000);
    assert_eq!(audio.samples, [-1.0, 0.0, 0.5, 127.0 / 128.0]);

    write_wav(&path, spec(1, 22050, 16, Int), &[-32768i16, 16384, 32767]);
    assert_eq!(read_wav(&path).unwrap().samples, [-1.0, 0.5, 32767.0 / 32768.0]);

    // 24-bit stereo: frames are averaged.
    let full = 1 << 23;
    write_wav(&path, spec(2, 48000, 24, Int), &[full / 2, -full / 2, -full, full / 4]);
    let audio = read_wav(&path).unwrap();
    assert_eq!(audio.sample_rate, 48000);
    assert_eq!(audio.samples, [0.0, -0.375]);

    write_wav(&path, spec(1, 8000, 32, Int), &[i32::MIN, 1 << 30]);
    assert_eq!(read_wav(&path).unwrap().samples, [-1.0, 0.5]);
}

#[test]
fn float_wavs_read_unchanged_and_non_finite_samples_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("float.wav");
    let float = spec(3, 44100, 32, hound::SampleFormat::Float);
    write_wav(&path, float, &[0.25f32, -0.5, 0.75, 1.5, 0.0, 0.0]);
    let audio = read_wav(&path).unwrap();
    assert_eq!(audio.sample_rate, 44100);
    assert_eq!(audio.samples, [0.5 / 3.0, 0.5]);
    assert!((audio.duration_seconds() - 2.0 / 44100.0).abs() < 1e-12);

    write_wav(&path, float, &[0.0f32, f32::NAN, 0.0]);
    assert!(audio_error(read_wav(&path)).contains("NaN"));
}

#[test]
fn the_file_writer_shows_nothing_until_finalized() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("out.wav");
    let entries = || std::fs::read_dir(dir.path()).unwrap().count();

    let mut sink = WavSink::create(&target, 24000).unwrap();
    sink.write(&[0.1; 1000]).unwrap();
    assert!(!target.exists(), "nothing under the target name while writing");
    assert_eq!(entries(), 1, "one temporary file beside the target");
    drop(sink);
    assert_eq!(entries(), 0, "an unfinalized writer leaves nothing behind");

    let mut sink = WavSink::create(&target, 24000).unwrap();
    sink.write(&[0.0, 0.5, -0.5]).unwrap();
    sink.write(&[]).unwrap();
    sink.write(&[2.0, -2.0, 1.0 / 32767.0]).unwrap();
    sink.finalize().unwrap();
    assert_eq!(entries(), 1);

    let mut reader = hound::WavReader::open(&target).unwrap();
    assert_eq!(reader.spec(), spec(1, 24000, 16, hound::SampleFormat::Int));
    let pcm: Vec<i16> = reader.samples::<i16>().map(Result::unwrap).collect();
    assert_eq!(pcm, [0, 16384, -16384, 32767, -32767, 1]);
}

#[test]
fn a_streamed_wav_has_unknown_lengths_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("streamed.wav");
    let mut sink = WavSink::streaming(std::fs::File::create(&path).unwrap(), 16000).unwrap();
    sink.write(&[0.25, -0.25]).unwrap();
    sink.write(&[0.5]).unwrap();
    sink.finalize().unwrap();

    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len(), 44 + 6);
    assert_eq!(bytes[..44], streaming_header(16000));
    assert_eq!(bytes[4..8], [0xff; 4], "RIFF length unknown");
    assert_eq!(bytes[40..44], [0xff; 4], "data length unknown");
    assert_eq!(bytes[44..], encode_pcm16_le(&[0.25, -0.25, 0.5]));

    let audio = read_wav(&path).unwrap();
    assert_eq!(audio.sample_rate, 16000);
    let expected: Vec<f32> = [8192.0f32, -8192.0, 16384.0].iter().map(|s| s / 32768.0).collect();
    assert_eq!(audio.samples, expected);

    // A file cut short mid-frame reads its whole frames.
    assert_eq!(read_wav_bytes(&bytes[..49], "cut").unwrap().samples, expected[..2]);
}

#[test]
fn encoders_write_little_endian_samples() {
    assert_eq!(
        encode_pcm16_le(&[0.0, 1.0, -1.0, 3.0]),
        [0, 0, 0xff, 0x7f, 0x01, 0x80, 0xff, 0x7f]
    );
    assert_eq!(encode_f32_le(&[1.0, -0.5]), [0, 0, 0x80, 0x3f, 0, 0, 0, 0xbf]);
}

#[test]
fn resampling_keeps_length_and_pitch() {
    for (rate, len) in [
        (8000u32, 8001usize),
        (11025, 3),
        (16000, 16000),
        (44100, 44101),
        (48000, 47999),
    ] {
        let tone: Vec<f32> = (0..len)
            .map(|i| (2.0 * std::f32::consts::PI * 440.0 * i as f32 / rate as f32).sin())
            .collect();
        let out = resample(&tone, rate, 24000).unwrap();
        assert_eq!(
            out.len(),
            (len as u64 * 24000).div_ceil(rate as u64) as usize,
            "{rate} Hz"
        );
        // Away from the edges, the output is the same tone sampled at 24 kHz.
        if len > 8000 {
            for (i, &y) in out.iter().enumerate().skip(1000).take(out.len() - 2000) {
                let want = (2.0 * std::f32::consts::PI * 440.0 * i as f32 / 24000.0).sin();
                assert!((y - want).abs() < 2e-3, "{rate} Hz, sample {i}: {y} vs {want}");
            }
        }
    }
    assert_eq!(resample(&[0.5, 0.25], 24000, 24000).unwrap(), [0.5, 0.25]);
    assert!(resample(&[], 16000, 24000).unwrap().is_empty());
    assert!(matches!(resample(&[0.0], 0, 24000), Err(Error::Audio(_))));
}

/// The committed clips (0.4 s of speech with a little white noise) and librosa's output for
/// them: see tests/data/resample/make_reference.py. Measured: rel L2 2.3e-3 / max abs 1.0e-3
/// from 16 kHz, 1.5e-3 / 2.4e-3 from 44.1 kHz (the noise dominates; see src/audio/resample.rs).
#[test]
fn resampling_matches_librosa() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/resample");
    for rate in [16000, 44100] {
        let clip = read_wav(&data.join(format!("clip{rate}.wav"))).unwrap();
        let reference = read_wav(&data.join(format!("clip{rate}-librosa24k.wav"))).unwrap();
        assert_eq!((clip.sample_rate, reference.sample_rate), (rate, 24000));
        let ours = resample(&clip.samples, rate, 24000).unwrap();
        assert_eq!(ours.len(), reference.samples.len());
        let (mut diff, mut norm, mut max_abs) = (0f64, 0f64, 0f32);
        for (&a, &b) in ours.iter().zip(&reference.samples) {
            diff += ((a - b) as f64).powi(2);
            norm += (b as f64).powi(2);
            max_abs = max_abs.max((a - b).abs());
        }
        let rel = (diff / norm).sqrt();
        println!("{rate} Hz -> 24 kHz vs librosa: rel L2 {rel:.2e}, max abs {max_abs:.2e}");
        assert!(
            rel < 5e-3 && max_abs < 5e-3,
            "{rate} Hz: rel L2 {rel:.2e}, max abs {max_abs:.2e}"
        );
    }
}
