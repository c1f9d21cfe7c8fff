//! The checkpoint's tokenizer (HF `tokenizer.json`) and incremental detokenization.

use crate::error::RuntimeError;
use std::path::Path;

/// A tokenizer with its special ids: a Hugging Face `tokenizer.json` (Llama-2: `<s>`/`</s>`,
/// BOS in front of every prompt) or one built from a GGUF file's metadata.
pub struct HiciTokenizer {
    inner: tokenizers::Tokenizer,
    /// Beginning of sequence.
    pub bos: Option<u32>,
    /// End of sequence.
    pub eos: Option<u32>,
    /// Whether prompts start with [`Self::bos`] (`tokenizer.ggml.add_bos_token`; true for
    /// Llama-2 `tokenizer.json` files).
    pub add_bos: bool,
    /// Ids that end a generation: EOS and, when the model names one, end-of-turn.
    pub stop_ids: Vec<u32>,
}

impl HiciTokenizer {
    /// Loads `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, RuntimeError> {
        if !path.is_file() {
            return Err(RuntimeError::Tokenizer(format!(
                "{}: no such file",
                path.display()
            )));
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| RuntimeError::Tokenizer(format!("{}: {e}", path.display())))?;
        let bos = inner.token_to_id("<s>");
        let eos = inner.token_to_id("</s>");
        Ok(Self {
            inner,
            bos,
            eos,
            add_bos: true,
            stop_ids: eos.into_iter().collect(),
        })
    }

    /// Builds the tokenizer a GGUF file describes (see [`crate::gguf_tokenizer`]).
    pub fn from_gguf(v: &hici_io::GgufVocab) -> Result<Self, RuntimeError> {
        let inner = crate::gguf_tokenizer::build(v)?;
        let mut stop_ids: Vec<u32> = v.eos.into_iter().chain(v.eot).collect();
        stop_ids.dedup();
        Ok(Self {
            inner,
            bos: v.bos,
            eos: v.eos,
            add_bos: v.add_bos,
            stop_ids,
        })
    }

    /// Encodes a prompt the way the model expects it: with BOS when [`Self::add_bos`].
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, RuntimeError> {
        self.encode(text, self.add_bos)
    }

    /// The text of token `id` (special tokens included).
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Decodes ids keeping special tokens (what a reference tokenizer's `decode` with
    /// `skip_special_tokens=False` gives).
    pub fn decode_with_special(&self, ids: &[u32]) -> Result<String, RuntimeError> {
        self.inner
            .decode(ids, false)
            .map_err(|e| RuntimeError::Tokenizer(format!("decode: {e}")))
    }

    /// Encodes `text`; `add_bos` prepends `<s>` (the tokenizer's post-processor does it when it
    /// has one, otherwise it is added here).
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, RuntimeError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| RuntimeError::Tokenizer(format!("encode: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if add_bos {
            if let Some(bos) = self.bos {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    /// Decodes ids, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, RuntimeError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| RuntimeError::Tokenizer(format!("decode: {e}")))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Incremental detokenizer: feeds ids one at a time and returns only complete new text.
///
/// It decodes a small window (one token of left context, so the decoder's leading-space strip
/// only ever hits the context token) and holds text back while it ends in U+FFFD, i.e. while a
/// UTF-8 character or a byte-fallback sequence is still incomplete.
pub struct StreamDecoder<'a> {
    tok: &'a HiciTokenizer,
    ids: Vec<u32>,
    prev: usize,
    cur: usize,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tok: &'a HiciTokenizer) -> Self {
        Self {
            tok,
            ids: Vec::new(),
            prev: 0,
            cur: 0,
        }
    }

    /// Adds one id; returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String, RuntimeError> {
        let prev_text = if self.cur > self.prev {
            self.tok.decode(&self.ids[self.prev..self.cur])?
        } else {
            String::new()
        };
        self.ids.push(id);
        let text = self.tok.decode(&self.ids[self.prev..])?;
        if text.len() > prev_text.len() && !text.ends_with('\u{FFFD}') {
            let new = text
                .get(prev_text.len()..)
                .map(str::to_string)
                .unwrap_or_default();
            self.prev = self.cur;
            self.cur = self.ids.len();
            Ok(new)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is still held back (an incomplete sequence at the end of generation).
    pub fn finish(&mut self) -> Result<String, RuntimeError> {
        let prev_text = if self.cur > self.prev {
            self.tok.decode(&self.ids[self.prev..self.cur])?
        } else {
            String::new()
        };
        let text = self.tok.decode(&self.ids[self.prev..])?;
        self.prev = self.ids.len();
        self.cur = self.ids.len();
        Ok(text.get(prev_text.len()..).unwrap_or_default().to_string())
    }
}
