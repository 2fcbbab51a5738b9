//! Qwen3-TTS-12Hz in candle.
pub mod attention;
pub mod code_predictor;
pub mod config;
pub mod engine;
pub mod gemv;
pub mod hub;
pub mod linear;
pub mod prompt;
pub mod q8;
pub mod sampling;
pub mod speaker_encoder;
pub mod speech_tokenizer;
pub mod talker;
pub mod tokenizer;
pub mod transformer;
pub mod tts;
pub mod weights;
