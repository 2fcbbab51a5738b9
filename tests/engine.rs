//! The batched engine API: ten different sequences stepped together (one dropped mid-way, one
//! joining late) give each sequence the codes it gets when stepped alone.

#[path = "parity/common.rs"]
#[allow(dead_code)]
mod common;
#[path = "parity/talker.rs"]
#[allow(dead_code)]
mod talker;

use common::{fixture_dirs, Fixture};
use koe::model::engine::{EndReason, GenerationParams, Sequence, StepInput, StepOutcome};
use koe::model::prompt::VoicePrompt;
use koe::model::prompt::{self, TalkerPrompt, TextMode};
use koe::model::sampling::margin;
use koe::model::tokenizer::assistant_text;
use koe::model::tts::TtsModel;

const TIE_MARGIN: f32 = 1e-4;

struct Spec {
    prompt: TalkerPrompt,
    max_new_tokens: usize,
}

/// Ten sequences: every case of the fixture, then extra texts, modes and lengths up to ten.
fn specs(fx: &Fixture, model: &TtsModel) -> Vec<Spec> {
    let max = fx.json["max_new_tokens"].as_u64().unwrap() as usize;
    let mut specs: Vec<Spec> = fx
        .cases()
        .iter()
        .map(|c| {
            let s = talker::setup_case(fx, model, c);
            Spec {
                prompt: s.prompt,
                max_new_tokens: s.max_new_tokens,
            }
        })
        .collect();
    let extra = [
        ("Short one.", true, TextMode::Streaming, max / 2),
        (
            "A longer sentence, with several words, to vary the prompt length.",
            false,
            TextMode::Streaming,
            max,
        ),
        ("Numbers: 1, 2, 3.", true, TextMode::NonStreaming, max - 3),
        ("Okay.", false, TextMode::NonStreaming, max),
    ];
    for (text, icl, mode, max_new_tokens) in extra.into_iter().cycle() {
        if specs.len() >= 10 {
            break;
        }
        let ids = model.tokenizer.encode(&assistant_text(text)).unwrap();
        let voice = talker::fixture_voice(fx, model, icl);
        let prompt = prompt::build(model, &ids, &voice, None, mode).unwrap();
        specs.push(Spec { prompt, max_new_tokens });
    }
    specs.truncate(10);
    specs
}

struct Alone {
    frames: Vec<Vec<u32>>,
    /// Per frame, the smallest top-1 − top-2 margin of its 16 greedy choices.
    margins: Vec<f32>,
    end: EndReason,
}

fn run_alone(model: &TtsModel, spec: &Spec) -> Alone {
    let seq = model
        .start(&spec.prompt, &GenerationParams::greedy(spec.max_new_tokens))
        .unwrap();
    run_to_end(model, seq)
}

fn run_to_end(model: &TtsModel, mut seq: Sequence) -> Alone {
    let (mut frames, mut margins) = (Vec::new(), Vec::new());
    loop {
        match model
            .step(&mut [&mut seq], &[StepInput::Sample], true)
            .unwrap()
            .remove(0)
        {
            StepOutcome::Frame { codes, trace } => {
                let t = trace.unwrap();
                let cp = t.cp_logits.to_vec2::<f32>().unwrap();
                let m = cp.iter().map(|row| margin(row)).fold(t.code0_margin, f32::min);
                frames.push(codes);
                margins.push(m);
            }
            StepOutcome::End(end) => return Alone { frames, margins, end },
        }
    }
}

#[test]
fn ten_sequences_batched_equal_alone() {
    let fx = Fixture::load(&fixture_dirs()[0]);
    let model = talker::load_model(&fx);
    let specs = specs(&fx, &model);
    assert_eq!(specs.len(), 10);
    let alone: Vec<Alone> = specs.iter().map(|s| run_alone(&model, s)).collect();

    const LATE: usize = 9; // joins at step 4
    const JOIN_STEP: usize = 4;
    const DROPPED: usize = 2; // dropped after step 6
    const DROP_STEP: usize = 6;
    let start = |i: usize| -> Sequence {
        model
            .start(&specs[i].prompt, &GenerationParams::greedy(specs[i].max_new_tokens))
            .unwrap()
    };
    let mut seqs: Vec<Option<Sequence>> = (0..10).map(|i| (i != LATE).then(|| start(i))).collect();
    let mut frames: Vec<Vec<Vec<u32>>> = vec![Vec::new(); 10];
    let mut ends: Vec<Option<EndReason>> = vec![None; 10];
    let mut max_batch = 0;
    for step in 0.. {
        if step == JOIN_STEP {
            seqs[LATE] = Some(start(LATE));
        }
        if step == DROP_STEP {
            seqs[DROPPED] = None;
        }
        let live: Vec<usize> = (0..10)
            .filter(|&i| seqs[i].as_ref().is_some_and(|s| s.ended().is_none()))
            .collect();
        if live.is_empty() && step > JOIN_STEP {
            break;
        }
        max_batch = max_batch.max(live.len());
        let mut batch: Vec<&mut Sequence> = seqs.iter_mut().flatten().filter(|s| s.ended().is_none()).collect();
        let inputs = vec![StepInput::Sample; batch.len()];
        let outcomes = model.step(&mut batch, &inputs, false).unwrap();
        for (&i, out) in live.iter().zip(outcomes) {
            match out {
                StepOutcome::Frame { codes, .. } => frames[i].push(codes),
                StepOutcome::End(e) => ends[i] = Some(e),
            }
        }
    }
    assert_eq!(max_batch, 10, "all ten must have stepped together at some point");

    let mut ties = 0;
    for i in 0..10 {
        let a = &alone[i];
        let expected_len = if i == DROPPED {
            DROP_STEP.min(a.frames.len())
        } else {
            a.frames.len()
        };
        let ours = &frames[i];
        // The first differing frame must be a float tie in the alone run; after a tie the two
        // runs legitimately follow different paths.
        match ours.iter().zip(&a.frames).position(|(x, y)| x != y) {
            Some(f) => {
                assert!(
                    a.margins[f] < TIE_MARGIN,
                    "sequence {i}: frame {f} differs batched vs alone with margin {}",
                    a.margins[f]
                );
                println!("sequence {i}: float tie at frame {f} (margin {:.2e})", a.margins[f]);
                ties += 1;
            }
            None => {
                assert_eq!(ours.len(), expected_len, "sequence {i}: frame count");
                if i != DROPPED {
                    assert_eq!(ends[i], Some(a.end), "sequence {i}: end reason");
                }
            }
        }
    }
    println!("10 sequences batched (max batch {max_batch}): identical to alone, {ties} float ties");
}

/// A voice's prompt rows prefilled by one utterance serve the next: same voice, language and
/// mode with another text reuse exactly `voice_rows` rows and give the codes of a full prefill;
/// another language, mode or voice reuses nothing.
#[test]
fn voice_prefix_is_reused_with_the_codes_of_a_full_prefill() {
    let fx = Fixture::load(&fixture_dirs()[0]);
    let model = talker::load_model(&fx);
    let max = fx.json["max_new_tokens"].as_u64().unwrap() as usize;
    let params = GenerationParams::greedy(max);
    let build = |text: &str, voice: &VoicePrompt, language: Option<u32>, mode: TextMode| {
        let ids = model.tokenizer.encode(&assistant_text(text)).unwrap();
        prompt::build(&model, &ids, voice, language, mode).unwrap()
    };
    let english = prompt::language_id(&model, "english").unwrap();
    for icl in [true, false] {
        let voice = talker::fixture_voice(&fx, &model, icl);
        for mode in [TextMode::Streaming, TextMode::NonStreaming] {
            let first = build("The first utterance of this voice.", &voice, None, mode);
            let seq = model.start(&first, &params).unwrap();
            let prefix = seq
                .prompt_prefix(&first.embeds.narrow(0, 0, first.voice_rows).unwrap())
                .unwrap();
            let next = build(
                "Then another one, longer than the first, with more words.",
                &voice,
                None,
                mode,
            );
            assert_eq!(next.voice_rows, first.voice_rows);
            assert_eq!(
                prefix.reusable_rows(&next.embeds).unwrap(),
                next.voice_rows,
                "icl {icl} {mode:?}"
            );
            let full = run_to_end(&model, model.start(&next, &params).unwrap());
            let reused = run_to_end(&model, model.start_with_prefix(&next, &params, Some(&prefix)).unwrap());
            match reused.frames.iter().zip(&full.frames).position(|(x, y)| x != y) {
                Some(f) => assert!(full.margins[f] < TIE_MARGIN, "icl {icl} {mode:?}: frame {f} differs"),
                None => {
                    assert_eq!(reused.frames.len(), full.frames.len());
                    assert_eq!(reused.end, full.end);
                }
            }
            let other_language = build("Then another one.", &voice, english, mode);
            assert_eq!(prefix.reusable_rows(&other_language.embeds).unwrap(), 0);
            let other_mode = match mode {
                TextMode::Streaming => TextMode::NonStreaming,
                TextMode::NonStreaming => TextMode::Streaming,
            };
            let other = build("Then another one.", &voice, None, other_mode);
            // x-vector prompts of both modes share the role, tag and speaker rows.
            let expected = if icl { 0 } else { other.voice_rows };
            assert_eq!(prefix.reusable_rows(&other.embeds).unwrap(), expected);
            let mut stranger = voice.clone();
            stranger.speaker_embedding = (&voice.speaker_embedding * 0.5).unwrap();
            let other_voice = build("Then another one.", &stranger, None, mode);
            assert_eq!(prefix.reusable_rows(&other_voice.embeds).unwrap(), 0);
        }
    }
}
