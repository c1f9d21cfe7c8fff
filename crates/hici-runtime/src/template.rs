//! The Llama-2 chat format the HiCI SFT checkpoint was trained with (spec §5.2).

use crate::error::RuntimeError;
use crate::tokenizer::HiciTokenizer;

/// One user turn, as in `fine-tune_hici_sft.py`: `[INST]{user}[/INST]` without a system
/// prompt, or the Llama-2 system template
/// `[INST] <<SYS>>\n{system}\n<</SYS>> \n\n {user} [/INST]` with one.
pub fn format_turn(system: Option<&str>, user: &str) -> String {
    match system {
        None => format!("[INST]{user}[/INST]"),
        Some(sys) => format!("[INST] <<SYS>>\n{sys}\n<</SYS>> \n\n {user} [/INST]"),
    }
}

/// A multi-turn conversation: `<s>turn1 answer1</s><s>turn2 ...`, with the system prompt on the
/// first turn only. The last entry's answer is `None` (the model answers it).
pub fn conversation_ids(
    tok: &HiciTokenizer,
    system: Option<&str>,
    turns: &[(String, Option<String>)],
) -> Result<Vec<u32>, RuntimeError> {
    let mut ids = Vec::new();
    for (i, (user, answer)) in turns.iter().enumerate() {
        let sys = if i == 0 { system } else { None };
        ids.extend(tok.encode(&format_turn(sys, user), true)?);
        if let Some(a) = answer {
            ids.extend(tok.encode(a, false)?);
            if let Some(eos) = tok.eos {
                ids.push(eos);
            }
        }
    }
    Ok(ids)
}
