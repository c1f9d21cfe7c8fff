//! A [`tokenizers::Tokenizer`] built in memory from a GGUF file's tokenizer description
//! ([`GgufVocab`]), written as the Hugging Face `tokenizer.json` document it corresponds to:
//!
//! - `gpt2`: byte-level BPE (vocab + merges); the pre-tokenizer is the one llama.cpp uses for
//!   `tokenizer.ggml.pre` (see [`pre_tokenizer`]); byte-level decoder.
//! - `llama`: SentencePiece-style BPE with byte fallback (`<0xNN>` tokens): `▁` for spaces
//!   (and a `▁` prefix when `add_space_prefix`), merges from the file or, when absent, derived
//!   from the scores as Hugging Face's SentencePiece converter does.
//!
//! Control (type 3) and user-defined (type 4) tokens become added tokens, matched anywhere in
//! the text (llama.cpp's `parse_special`); control tokens are skipped when decoding.

use crate::error::RuntimeError;
use hici_io::GgufVocab;
use serde_json::{json, Value};
use std::collections::HashMap;

/// llama.cpp token types.
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

/// Llama-3's split (llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split (llama.cpp `LLAMA_VOCAB_PRE_TYPE_QWEN2`).
const QWEN2_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.ggml.pre` names understood, for error messages.
pub const SUPPORTED_PRE: &str =
    "default, gpt2, gpt-2, smollm, starcoder, refact, llama-bpe, llama3, qwen2";

fn split(pattern: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
}

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// The pre-tokenizer llama.cpp applies for `pre` (its `llama_vocab` pre-types; `ByteLevel`
/// with `use_regex` is GPT-2's split), and whether
/// BPE merges are skipped for words that are whole tokens (`ignore_merges`, Llama-3).
pub fn pre_tokenizer(pre: Option<&str>) -> Result<(Value, bool), RuntimeError> {
    Ok(match pre.unwrap_or("default") {
        "default" | "gpt2" | "gpt-2" => (byte_level(true), false),
        // every digit on its own, then GPT-2's split
        "smollm" | "starcoder" | "refact" => (
            json!({"type": "Sequence", "pretokenizers": [split(r"\p{N}"), byte_level(true)]}),
            false,
        ),
        "llama-bpe" | "llama3" => (
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]}),
            true,
        ),
        "qwen2" => (
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]}),
            false,
        ),
        other => {
            return Err(RuntimeError::Tokenizer(format!(
                "pre-tokenizer `{other}` (tokenizer.ggml.pre) is not supported; supported: \
                 {SUPPORTED_PRE}"
            )))
        }
    })
}

fn added_tokens(v: &GgufVocab) -> Vec<Value> {
    v.token_types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == TOKEN_CONTROL || t == TOKEN_USER_DEFINED)
        .map(|(id, &t)| {
            json!({"id": id, "content": v.tokens[id], "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": t == TOKEN_CONTROL})
        })
        .collect()
}

/// Merges for a SentencePiece vocabulary without stored merges: every split of a piece into
/// two pieces of the vocabulary, ordered by the merged piece's score (higher first), ties by
/// the ids of the halves (Hugging Face's `SentencePieceExtractor`).
fn spm_merges(v: &GgufVocab) -> Vec<(String, String)> {
    let ids: HashMap<&str, usize> = v
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (id, piece) in v.tokens.iter().enumerate() {
        if v.token_types.get(id).is_some_and(|&t| t != 1) {
            continue; // only normal pieces are merge results
        }
        for (cut, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(cut);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                merges.push((v.scores.get(id).copied().unwrap_or(0.0), id, li, ri));
            }
        }
    }
    merges.sort_by(|a, b| {
        b.0.partial_cmp(&a.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then((a.1, a.2, a.3).cmp(&(b.1, b.2, b.3)))
    });
    merges
        .into_iter()
        .map(|(_, _, l, r)| (v.tokens[l].clone(), v.tokens[r].clone()))
        .collect()
}

/// The Hugging Face `tokenizer.json` document for `v`.
pub fn tokenizer_json(v: &GgufVocab) -> Result<Value, RuntimeError> {
    let vocab: serde_json::Map<String, Value> = v
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    if vocab.len() != v.tokens.len() {
        return Err(RuntimeError::Tokenizer(
            "tokenizer.ggml.tokens has duplicate entries".into(),
        ));
    }
    let pair = |m: &str| -> Result<Value, RuntimeError> {
        let (a, b) = m.split_once(' ').ok_or_else(|| {
            RuntimeError::Tokenizer(format!("tokenizer.ggml.merges entry `{m}` has no space"))
        })?;
        Ok(json!([a, b]))
    };
    let doc = match v.model.as_str() {
        "gpt2" => {
            let (pre, ignore_merges) = pre_tokenizer(v.pre.as_deref())?;
            let merges = v
                .merges
                .iter()
                .map(|m| pair(m))
                .collect::<Result<Vec<_>, _>>()?;
            json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added_tokens(v),
                "normalizer": null,
                "pre_tokenizer": pre,
                "post_processor": null,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null,
                          "continuing_subword_prefix": "", "end_of_word_suffix": "",
                          "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
                          "vocab": vocab, "merges": merges}
            })
        }
        "llama" => {
            let merges: Vec<Value> = if v.merges.is_empty() {
                spm_merges(v)
                    .into_iter()
                    .map(|(a, b)| json!([a, b]))
                    .collect()
            } else {
                v.merges.iter().map(|m| pair(m)).collect::<Result<_, _>>()?
            };
            let mut norm =
                vec![json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"})];
            let mut dec = vec![
                json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if v.add_space_prefix {
                norm.insert(0, json!({"type": "Prepend", "prepend": "\u{2581}"}));
                dec.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            let unk = v.unk.map(|u| v.tokens[u as usize].clone());
            json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added_tokens(v),
                "normalizer": {"type": "Sequence", "normalizers": norm},
                "pre_tokenizer": null,
                "post_processor": null,
                "decoder": {"type": "Sequence", "decoders": dec},
                "model": {"type": "BPE", "dropout": null, "unk_token": unk,
                          "continuing_subword_prefix": null, "end_of_word_suffix": null,
                          "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                          "vocab": vocab, "merges": merges}
            })
        }
        other => {
            return Err(RuntimeError::Tokenizer(format!(
                "tokenizer model `{other}` (tokenizer.ggml.model) is not supported; supported: \
                 gpt2, llama"
            )))
        }
    };
    Ok(doc)
}

/// Builds the runnable tokenizer for `v`.
pub fn build(v: &GgufVocab) -> Result<tokenizers::Tokenizer, RuntimeError> {
    let doc = tokenizer_json(v)?;
    let text = serde_json::to_string(&doc)
        .map_err(|e| RuntimeError::Tokenizer(format!("serialising the GGUF tokenizer: {e}")))?;
    text.parse::<tokenizers::Tokenizer>()
        .map_err(|e| RuntimeError::Tokenizer(format!("building the GGUF tokenizer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(
        model: &str,
        tokens: &[&str],
        types: &[i32],
        scores: &[f32],
        merges: &[&str],
    ) -> GgufVocab {
        GgufVocab {
            model: model.into(),
            pre: None,
            tokens: tokens.iter().map(|s| s.to_string()).collect(),
            token_types: types.to_vec(),
            scores: scores.to_vec(),
            merges: merges.iter().map(|s| s.to_string()).collect(),
            bos: None,
            eos: None,
            eot: None,
            unk: Some(0),
            pad: None,
            add_bos: false,
            add_eos: false,
            add_space_prefix: true,
            chat_template: None,
        }
    }

    #[test]
    fn sentencepiece_merges_follow_scores_and_bytes_fall_back() {
        // pieces: "▁ab" should come from merging "▁a"+"b" (score -1), "▁a" from "▁"+"a" (-2)
        let v = vocab(
            "llama",
            &[
                "<unk>",
                "<s>",
                "\u{2581}",
                "a",
                "b",
                "\u{2581}a",
                "\u{2581}ab",
                "<0x21>",
            ],
            &[2, 3, 1, 1, 1, 1, 1, 6],
            &[0., 0., -5., -6., -7., -2., -1., 0.],
            &[],
        );
        let m = spm_merges(&v);
        assert_eq!(m[0], ("\u{2581}a".into(), "b".into()));
        assert_eq!(m[1], ("\u{2581}".into(), "a".into()));
        let tok = build(&v).unwrap();
        let enc = tok.encode("ab ab!", false).unwrap();
        // "▁ab" "▁ab" then '!' through byte fallback
        assert_eq!(enc.get_ids(), &[6, 6, 7]);
        assert_eq!(tok.decode(&[6, 6, 7], true).unwrap(), "ab ab!");
        // control tokens are matched in text and skipped on decode
        assert_eq!(tok.encode("<s>ab", false).unwrap().get_ids(), &[1, 6]);
    }

    #[test]
    fn unknown_models_and_pre_tokenizers_are_named() {
        let mut v = vocab("gpt2", &["a"], &[1], &[], &[]);
        v.pre = Some("mystery".into());
        let e = build(&v).unwrap_err().to_string();
        assert!(e.contains("`mystery`") && e.contains("smollm"), "{e}");
        let v = vocab("rwkv", &["a"], &[1], &[], &[]);
        assert!(build(&v).unwrap_err().to_string().contains("`rwkv`"));
        let v = vocab("gpt2", &["a", "b"], &[1, 1], &[], &["ab"]);
        assert!(build(&v).unwrap_err().to_string().contains("`ab`"));
    }

    #[test]
    fn every_known_pre_tokenizer_builds_and_splits() {
        // byte-level alphabet + a few merges: enough to run each pre-tokenizer
        let bytes: Vec<String> = (0u8..=255)
            .map(|b| char::from_u32(byte_char(b)).unwrap().to_string())
            .collect();
        let refs: Vec<&str> = bytes.iter().map(String::as_str).collect();
        let types = vec![1; refs.len()];
        for pre in SUPPORTED_PRE.split(", ") {
            let mut v = vocab("gpt2", &refs, &types, &[], &[]);
            v.pre = Some(pre.to_string());
            let tok = build(&v).unwrap();
            let text = "Hello  world 12345!\n";
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(ids.get_ids().len(), text.len(), "{pre}");
            assert_eq!(tok.decode(ids.get_ids(), true).unwrap(), text, "{pre}");
        }
    }

    /// GPT-2's bytes-to-unicode table.
    fn byte_char(b: u8) -> u32 {
        let printable = |c: u8| {
            (b'!'..=b'~').contains(&c) || (0xA1..=0xAC).contains(&c) || (0xAE..=0xFF).contains(&c)
        };
        if printable(b) {
            return b as u32;
        }
        let n = (0u8..b).filter(|&c| !printable(c)).count() as u32;
        256 + n
    }
}
