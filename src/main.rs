//! The `koe` command line: `koe say` (text → WAV, streamed as it is generated) and
//! `koe bench` (the reference benchmark's workload, same JSON keys).

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use koe::audio::wav::WavSink;
use koe::config::Settings;
use koe::model::engine::GenerationParams;
use koe::model::hub;
use koe::model::linear::WeightFormat;
use koe::model::prompt::TextMode;
use koe::model::sampling::SamplingParams;
use koe::synth::{Synthesizer, SAMPLE_RATE};
use koe::voices::VoiceStore;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser)]
#[command(name = "koe", version, about = "Qwen3-TTS voice synthesis in candle")]
struct Cli {
    /// Settings file (TOML) over config/default.toml; KOE_<SECTION>_<KEY> variables override both.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Speak a text in a voice and write a 24 kHz 16-bit WAV, streamed as frames are decoded.
    Say(SayArgs),
    /// Time the reference benchmark's workload (bench_reference.py) and write its JSON keys.
    Bench(BenchArgs),
}

#[derive(Args)]
struct ModelArgs {
    /// Checkpoint directory or Hugging Face repo id [default: model.id of the settings].
    #[arg(long)]
    model: Option<String>,
    /// Talker weights: f32 (parity), q8_0 or q4_k (quantized CPU modes) [default: model.dtype].
    #[arg(long)]
    dtype: Option<String>,
    /// Never download: use the Hugging Face cache only (also HF_HUB_OFFLINE=1).
    #[arg(long)]
    offline: bool,
}

#[derive(Args)]
struct SayArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A voice id under --voices, or a voice directory.
    #[arg(long, default_value = "default")]
    voice: String,
    /// Where voice profiles live.
    #[arg(long, default_value = "voices")]
    voices: PathBuf,
    /// The text to speak; `-` reads standard input.
    #[arg(long)]
    text: String,
    /// `auto` or a language the model knows (english, german, …) [default: the voice's].
    #[arg(long)]
    language: Option<String>,
    /// Output WAV; `-` writes to standard output.
    #[arg(long, default_value = "out.wav")]
    out: PathBuf,
    /// Greedy decoding (the parity mode) instead of sampling.
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p", "seed"])]
    greedy: bool,
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Emit at most this many frames (12.5 per second of audio).
    #[arg(long)]
    max_frames: Option<usize>,
    /// Clone from the speaker embedding alone, even for an ICL voice.
    #[arg(long)]
    x_vector_only: bool,
    /// Feed all text before the codec side (the package's non_streaming_mode).
    #[arg(long)]
    non_streaming_text: bool,
    /// Frames decoded per decoder step after the first frame (which is decoded alone, for
    /// time to first audio): more costs less per frame, and adds latency between chunks.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=25))]
    decode_frames: u16,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Frames per run (exactly: EOS is held off).
    #[arg(long, default_value_t = 50)]
    frames: usize,
    /// Also step this many sequences together and report aggregate frames/s, beside one
    /// sequence stepped alone right before it and the ratio of the two (`batch_speedup`).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed runs after one warm-up; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// The 24 kHz mono reference clip (pass the same one to bench_reference.py --ref-wav).
    #[arg(long)]
    ref_wav: PathBuf,
    /// x-vector-only voice instead of ICL.
    #[arg(long)]
    xvec: bool,
    /// Write the result here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() {
    koe::fix_thread_count();
    keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = Settings::load(cli.config.as_deref())
        .map_err(anyhow::Error::from)
        .and_then(|settings| match cli.command {
            Command::Say(args) => say(&settings, args),
            Command::Bench(args) => bench(&settings, args),
        });
    if let Err(e) = result {
        eprintln!("koe: {e:#}");
        std::process::exit(1);
    }
}

/// A decode step allocates and frees buffers of up to a few hundred KiB per layer. glibc's
/// adaptive thresholds hand freed heap tops (and mmapped chunks) back to the kernel, so the
/// next step faults every page in again and the kernel zeroes it: ~2 % of a batch-10 q8_0 step
/// on a 2-core Zen 4 (`clear_page_erms` in `perf`; 0.4 % with these settings). Fixed thresholds
/// keep those buffers in the heap.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes allocator parameters; called before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

fn device(settings: &Settings) -> Result<Device> {
    Ok(match settings.model.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0).context("model.device = cuda")?,
        "metal" => Device::new_metal(0).context("model.device = metal")?,
        other => bail!("unknown device {other}"),
    })
}

/// Resolves and loads the checkpoint, with a progress bar; returns it and its identity (the
/// key of cached voice prompts).
fn load(settings: &Settings, args: &ModelArgs) -> Result<(Synthesizer, String)> {
    let spec = args.model.clone().unwrap_or_else(|| settings.model.id.clone());
    let dtype: WeightFormat = args
        .dtype
        .as_deref()
        .unwrap_or(&settings.model.dtype)
        .parse()
        .map_err(anyhow::Error::msg)?;
    let dir = hub::resolve(&spec, args.offline)?;
    let bar = ProgressBar::new_spinner().with_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}")?);
    bar.set_message(format!("loading {}", dir.display()));
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    let synth = Synthesizer::load(&dir, &device(settings)?, dtype)?;
    bar.set_message("warming up");
    synth.warm_up()?;
    bar.finish_and_clear();
    let canonical = dir.canonicalize().unwrap_or(dir);
    let weights_len = std::fs::metadata(canonical.join("model.safetensors"))
        .map(|m| m.len())
        .unwrap_or(0);
    Ok((synth, format!("{}#{weights_len}", canonical.display())))
}

fn read_text(text: &str) -> Result<String> {
    if text != "-" {
        return Ok(text.to_string());
    }
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("reading the text from standard input")?;
    Ok(s.trim_end_matches('\n').to_string())
}

fn say(settings: &Settings, args: SayArgs) -> Result<()> {
    let text = read_text(&args.text)?;
    settings.check_text(&text)?;
    let store = VoiceStore::open(&args.voices)?;
    let profile = store.resolve(&args.voice)?;
    let max_frames = args.max_frames.unwrap_or(settings.limits.max_frames);
    if max_frames == 0 || max_frames > settings.limits.max_frames {
        bail!("--max-frames must be in 1..={}", settings.limits.max_frames);
    }
    let g = &settings.generation;
    let sampling = if args.greedy {
        SamplingParams::GREEDY
    } else {
        SamplingParams {
            greedy: g.greedy,
            temperature: args.temperature.unwrap_or(g.temperature),
            top_k: args.top_k.unwrap_or(g.top_k),
            top_p: args.top_p.unwrap_or(g.top_p),
        }
    };
    let params = GenerationParams {
        talker: sampling,
        code_predictor: sampling,
        repetition_penalty: g.repetition_penalty,
        // The package's max_new_tokens = N yields at most N − 1 frames.
        max_new_tokens: max_frames + 1,
        min_new_tokens: 2,
        seed: args.seed,
    };
    params.validate()?;
    let (synth, identity) = load(settings, &args.model)?;
    let voice = synth.profile_voice(&profile, &settings.limits, &identity, args.x_vector_only)?;
    let language = args
        .language
        .clone()
        .unwrap_or_else(|| profile.manifest.language.clone());
    let mode = if args.non_streaming_text {
        TextMode::NonStreaming
    } else {
        TextMode::Streaming
    };

    let started = Instant::now();
    let mut sink = WavSink::create(&args.out, SAMPLE_RATE)?;
    let mut utt = synth.start(&voice, &text, &language, mode, &params)?;
    let mut ttfa = None;
    let mut samples = 0usize;
    while let Some(pcm) = utt.next_audio_frames(&synth, if ttfa.is_some() { args.decode_frames.into() } else { 1 })? {
        let pcm = pcm.to_vec1::<f32>()?;
        sink.write(&pcm)?;
        ttfa.get_or_insert_with(|| started.elapsed().as_secs_f64());
        samples += pcm.len();
    }
    sink.finalize()?;
    let elapsed = started.elapsed().as_secs_f64();
    let audio_s = samples as f64 / SAMPLE_RATE as f64;
    eprintln!(
        "{} frames, {audio_s:.2} s of audio ({}), time to first audio {:.3} s, real-time factor {:.2}{}",
        utt.frames.len(),
        utt.end.map_or("?", |e| e.as_str()),
        ttfa.unwrap_or(elapsed),
        elapsed / audio_s.max(1e-9),
        if args.out == Path::new("-") {
            String::new()
        } else {
            format!(", wrote {}", args.out.display())
        }
    );
    Ok(())
}

fn bench(settings: &Settings, args: BenchArgs) -> Result<()> {
    let clip = koe::voices::load_reference(&args.ref_wav, &settings.limits, SAMPLE_RATE)?;
    let (synth, _) = load(settings, &args.model)?;
    let opts = koe::bench::BenchOptions {
        frames: args.frames,
        batch: args.batch,
        repeat: args.repeat,
        xvec: args.xvec,
    };
    if opts.frames < 2 || opts.batch == 0 || opts.repeat == 0 {
        bail!("--frames must be >= 2, --batch and --repeat >= 1");
    }
    let mut result = koe::bench::run(&synth, &clip, &opts)?;
    result["dtype"] = args
        .model
        .dtype
        .clone()
        .unwrap_or_else(|| settings.model.dtype.clone())
        .into();
    let text = serde_json::to_string_pretty(&result)?;
    println!("{text}");
    if let Some(path) = args.json {
        std::fs::write(&path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
