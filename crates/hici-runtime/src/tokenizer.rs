//! The checkpoint's tokenizer (HF `tokenizer.json`) and incremental detokenization.

use crate::error::RuntimeError;
use std::path::Path;

/// A Llama-2 style tokenizer with its special ids.
pub struct HiciTokenizer {
    inner: tokenizers::Tokenizer,
    /// `<s>` (added in front of every prompt).
    pub bos: Option<u32>,
    /// `</s>`.
    pub eos: Option<u32>,
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
        Ok(Self { inner, bos, eos })
    }

    /// Encodes `text`; `add_bos` prepends `<s>` (the tokenizer's post-processor does it when it
    /// has one, otherwise it is added here).
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, RuntimeError> {
        let enc = self
            .inner
            .encode(text, add_bos)
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
