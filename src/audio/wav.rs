//! WAV in and out: any common WAV read as mono f32, 16-bit PCM written as it is generated,
//! and the little-endian sample encoders used for streaming.

use crate::error::{Error, Result};
use std::fs::File;
use std::io::{BufWriter, Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Mono samples in [-1, 1] at `sample_rate` Hz.
#[derive(Debug, Clone, PartialEq)]
pub struct Audio {
    pub samples: Vec<f32>,
    pub sample_rate: u32,
}

impl Audio {
    pub fn duration_seconds(&self) -> f64 {
        self.samples.len() as f64 / self.sample_rate as f64
    }
}

/// Reads a WAV file (8/16/24/32-bit integer or 32-bit float PCM, any rate, any channel
/// count) as mono: channels are averaged, integers scaled by 2^-(bits-1) (as soundfile does).
pub fn read_wav(path: &Path) -> Result<Audio> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    read_wav_bytes(&bytes, &path.display().to_string())
}

/// [`read_wav`] for a WAV held in memory (an upload); `source` names it in errors.
pub fn read_wav_bytes(bytes: &[u8], source: &str) -> Result<Audio> {
    let fitted = fit_streamed_data_chunk(bytes, source);
    let bytes = fitted.as_deref().unwrap_or(bytes);
    let unreadable = |e: hound::Error| Error::Audio(format!("{source}: not a readable WAV file ({e})"));
    let mut reader = hound::WavReader::new(Cursor::new(bytes)).map_err(unreadable)?;
    let spec = reader.spec();
    let channels = spec.channels as usize;
    if channels == 0 || spec.sample_rate == 0 || !(1..=32).contains(&spec.bits_per_sample) {
        return Err(Error::Audio(format!(
            "{source}: WAV header has {channels} channels of {} bits at {} Hz",
            spec.bits_per_sample, spec.sample_rate
        )));
    }
    let interleaved = match spec.sample_format {
        hound::SampleFormat::Float => reader.samples::<f32>().collect::<std::result::Result<Vec<f32>, _>>(),
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f32;
            reader.samples::<i32>().map(|s| s.map(|v| v as f32 * scale)).collect()
        }
    }
    .map_err(unreadable)?;
    if interleaved.iter().any(|s| !s.is_finite()) {
        return Err(Error::Audio(format!("{source}: has NaN or infinite samples")));
    }
    let samples = if channels == 1 {
        interleaved
    } else {
        interleaved
            .chunks_exact(channels)
            .map(|frame| frame.iter().sum::<f32>() / channels as f32)
            .collect()
    };
    Ok(Audio {
        samples,
        sample_rate: spec.sample_rate,
    })
}

/// A WAV written to a pipe declares a data length it cannot know (see [`streaming_header`]),
/// and a cut-off file declares more than it holds; hound rejects both. Like libsndfile, read
/// what is there: returns a copy whose data chunk length is cut to the whole frames present,
/// or `None` when the header already fits.
fn fit_streamed_data_chunk(bytes: &[u8], source: &str) -> Option<Vec<u8>> {
    if bytes.len() < 12 || &bytes[..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return None;
    }
    let le_u32 = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let mut block_align = None;
    let mut pos = 12;
    while pos + 8 <= bytes.len() {
        let (id, len, body) = (&bytes[pos..pos + 4], le_u32(pos + 4) as usize, pos + 8);
        if id == b"fmt " && len >= 16 && body + 16 <= bytes.len() {
            block_align = Some(u16::from_le_bytes([bytes[body + 12], bytes[body + 13]]) as usize);
        }
        if id == b"data" {
            let present = bytes.len() - body;
            let align = block_align.filter(|&a| a > 0)?;
            if len <= present {
                return None;
            }
            if len != STREAMING_LEN as usize {
                tracing::warn!("{source}: data chunk cut short ({present} of {len} bytes); reading what is there");
            }
            let mut fitted = bytes.to_vec();
            fitted[pos + 4..pos + 8].copy_from_slice(&((present / align * align) as u32).to_le_bytes());
            return Some(fitted);
        }
        pos = body + len + (len & 1); // chunks are padded to even lengths
    }
    None
}

/// The length written for the RIFF and data chunks of a streamed WAV: "unknown" as streaming
/// servers write it. Readers that honour it stop at the end of the stream.
const STREAMING_LEN: u32 = u32::MAX;

/// The 44-byte header of a 16-bit mono PCM WAV whose length is not known when it is sent (a
/// pipe or an HTTP response): both lengths are `0xFFFFFFFF`. Hand-written because hound's
/// writer needs to seek back and patch the lengths, which a pipe cannot do.
pub fn streaming_header(sample_rate: u32) -> [u8; 44] {
    let mut header = [0u8; 44];
    let fields: [&[u8]; 13] = [
        b"RIFF",
        &STREAMING_LEN.to_le_bytes(),
        b"WAVE",
        b"fmt ",
        &16u32.to_le_bytes(), // fmt chunk length
        &1u16.to_le_bytes(),  // PCM
        &1u16.to_le_bytes(),  // channels
        &sample_rate.to_le_bytes(),
        &(sample_rate * 2).to_le_bytes(), // bytes per second
        &2u16.to_le_bytes(),              // bytes per frame
        &16u16.to_le_bytes(),             // bits per sample
        b"data",
        &STREAMING_LEN.to_le_bytes(),
    ];
    let mut at = 0;
    for field in fields {
        header[at..at + field.len()].copy_from_slice(field);
        at += field.len();
    }
    header
}

/// One sample as 16-bit PCM: clamped to [-1, 1], scaled by 32767 (libsndfile's convention).
fn to_pcm16(sample: f32) -> i16 {
    (sample.clamp(-1.0, 1.0) * 32767.0).round() as i16
}

/// Samples as 16-bit little-endian PCM bytes (clamped).
pub fn encode_pcm16_le(samples: &[f32]) -> Vec<u8> {
    samples.iter().flat_map(|&s| to_pcm16(s).to_le_bytes()).collect()
}

/// Samples as 32-bit little-endian float bytes (unchanged).
pub fn encode_f32_le(samples: &[f32]) -> Vec<u8> {
    samples.iter().flat_map(|s| s.to_le_bytes()).collect()
}

/// A 16-bit mono WAV written chunk by chunk as audio is generated.
///
/// To a file, it is written under a temporary name beside the target and renamed onto it by
/// [`WavSink::finalize`]; dropped unfinalized (an error, a cancelled request), the temporary
/// file is removed, so nothing half-written ever appears under the target's name. To a stream
/// (`-`, stdout), the header goes out first with unknown lengths ([`streaming_header`]).
pub struct WavSink {
    out: SinkOutput,
}

enum SinkOutput {
    // Field order is drop order: hound's writer closes the file before the part file is removed.
    File {
        writer: hound::WavWriter<BufWriter<File>>,
        part: PartFile,
        target: PathBuf,
    },
    Stream(Box<dyn Write + Send>),
}

impl WavSink {
    /// A sink writing `path`, or stdout when `path` is `-`.
    pub fn create(path: &Path, sample_rate: u32) -> Result<Self> {
        if path == Path::new("-") {
            return Self::streaming(BufWriter::new(std::io::stdout()), sample_rate);
        }
        let (part, file) = PartFile::create(path)?;
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let writer = hound::WavWriter::new(BufWriter::new(file), spec).map_err(|e| part.error(e))?;
        Ok(Self {
            out: SinkOutput::File {
                writer,
                part,
                target: path.to_path_buf(),
            },
        })
    }

    /// A sink writing a streamed WAV (header with unknown lengths, then samples) to `writer`.
    pub fn streaming(mut writer: impl Write + Send + 'static, sample_rate: u32) -> Result<Self> {
        writer.write_all(&streaming_header(sample_rate)).map_err(stream_error)?;
        Ok(Self {
            out: SinkOutput::Stream(Box::new(writer)),
        })
    }

    /// Appends samples (clamped to [-1, 1]).
    pub fn write(&mut self, samples: &[f32]) -> Result<()> {
        match &mut self.out {
            SinkOutput::File { writer, part, .. } => {
                let mut pcm = writer.get_i16_writer(samples.len() as u32);
                for &s in samples {
                    pcm.write_sample(to_pcm16(s));
                }
                pcm.flush().map_err(|e| part.error(e))
            }
            SinkOutput::Stream(w) => w.write_all(&encode_pcm16_le(samples)).map_err(stream_error),
        }
    }

    /// Completes the WAV: a file gets its final header and appears under the target name.
    pub fn finalize(self) -> Result<()> {
        match self.out {
            SinkOutput::File { writer, part, target } => {
                writer.finalize().map_err(|e| part.error(e))?;
                part.rename_to(&target)
            }
            SinkOutput::Stream(mut w) => w.flush().map_err(stream_error),
        }
    }
}

fn stream_error(source: std::io::Error) -> Error {
    Error::Io {
        path: PathBuf::from("-"),
        source,
    }
}

/// A file written beside its final name (`.NAME.PID-N.part`) and removed when dropped,
/// unless [`PartFile::rename_to`] moved it onto the final name.
pub(crate) struct PartFile {
    path: PathBuf,
    renamed: bool,
}

impl PartFile {
    pub(crate) fn create(target: &Path) -> Result<(Self, File)> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = target.file_name().ok_or_else(|| Error::Io {
            path: target.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
        })?;
        let path = target.with_file_name(format!(
            ".{}.{}-{}.part",
            name.to_string_lossy(),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
        Ok((Self { path, renamed: false }, file))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// An error while writing this file, naming it.
    pub(crate) fn error(&self, e: impl std::fmt::Display) -> Error {
        Error::Io {
            path: self.path.clone(),
            source: std::io::Error::other(e.to_string()),
        }
    }

    pub(crate) fn rename_to(mut self, target: &Path) -> Result<()> {
        std::fs::rename(&self.path, target).map_err(|source| Error::Io {
            path: target.to_path_buf(),
            source,
        })?;
        self.renamed = true;
        Ok(())
    }
}

impl Drop for PartFile {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
