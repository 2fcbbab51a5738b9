//! The Qwen3-TTS language-model half loaded from a checkpoint directory: configs, text
//! tokenizer, talker and code predictor.

use super::code_predictor::CodePredictor;
use super::config::{GenerationConfig, Qwen3TtsConfig};
use super::linear::WeightFormat;
use super::talker::Talker;
use super::tokenizer::TextTokenizer;
use super::weights;
use crate::error::Result;
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

pub struct TtsModel {
    pub dir: PathBuf,
    pub config: Qwen3TtsConfig,
    pub generation: GenerationConfig,
    pub tokenizer: TextTokenizer,
    pub talker: Talker,
    pub code_predictor: CodePredictor,
    pub device: Device,
    pub format: WeightFormat,
}

impl TtsModel {
    /// Loads a checkpoint directory in the release's layout.
    pub fn load(dir: &Path, device: &Device, format: WeightFormat) -> Result<Self> {
        let config = Qwen3TtsConfig::load(&dir.join("config.json"))?;
        let generation = GenerationConfig::load_or_default(&dir.join("generation_config.json"))?;
        let tokenizer = TextTokenizer::load(dir)?;
        let file = dir.join("model.safetensors");
        let format = match format {
            WeightFormat::Dense
                if device.is_cpu() && weights::stored_dtype(&file, "talker.codec_head.weight")? == DType::BF16 =>
            {
                WeightFormat::StoredBf16
            }
            other => other,
        };
        let vb = weights::mmap(&file, weights::compute_dtype(device), device)?;
        let talker = weights::in_file(&file, Talker::load(vb.pp("talker"), &config.talker_config, format))?;
        let code_predictor = weights::in_file(
            &file,
            CodePredictor::load(vb.pp("talker.code_predictor"), &config.talker_config, format),
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            generation,
            tokenizer,
            talker,
            code_predictor,
            device: device.clone(),
            format,
        })
    }

    pub fn num_code_groups(&self) -> usize {
        self.config.talker_config.num_code_groups
    }

    /// Sum of the G code embeddings of each frame (codebook 0 from the talker's codec
    /// embedding, the rest from the code predictor's): [frames, hidden]. This is both the ICL
    /// prompt's codec side and the fed-back input of every generation step.
    pub fn frame_embeddings(&self, codes: &Tensor) -> Result<Tensor> {
        let codes = codes.to_device(&self.device)?.to_dtype(candle_core::DType::U32)?;
        let code0: Vec<u32> = codes.narrow(1, 0, 1)?.flatten_all()?.to_vec1()?;
        let mut sum = self.talker.embed_codec(&code0)?;
        for g in 1..self.num_code_groups() {
            let ids = codes.narrow(1, g, 1)?.flatten_all()?;
            sum = (sum + self.code_predictor.embed(g, &ids)?)?;
        }
        Ok(sum)
    }
}
