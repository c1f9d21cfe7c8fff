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

/// One chat message (`role` is `system`, `user` or `assistant`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A model's own Jinja chat template (`tokenizer.chat_template` in GGUF, `chat_template` in an
/// HF `tokenizer_config.json`), rendered with minijinja the way Hugging Face's
/// `apply_chat_template` does: `trim_blocks`, `lstrip_blocks`, Python string methods
/// (`.strip()`, `.startswith()`, ...), `raise_exception`, and the variables `messages`,
/// `add_generation_prompt`, `bos_token`, `eos_token`.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are the texts the template may insert.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, RuntimeError> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| RuntimeError::Input(format!("the model's chat template: {e}")))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Renders `messages`, ending with the assistant prefix when `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, RuntimeError> {
        let t = self
            .env
            .get_template("chat")
            .map_err(|e| RuntimeError::Input(format!("the model's chat template: {e}")))?;
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| RuntimeError::Input(format!("rendering the model's chat template: {e}")))
    }
}

/// How a model's chat prompts are built.
pub enum ChatFormat {
    /// The Llama-2 `[INST]` format HiCI's SFT checkpoint was trained with ([`format_turn`]),
    /// for models that carry no template.
    Llama2,
    /// The model's own template.
    Template(Box<ChatTemplate>),
}

impl ChatFormat {
    /// The model's template when it has one, else [`ChatFormat::Llama2`].
    pub fn from_model(template: Option<&str>, tok: &HiciTokenizer) -> Result<Self, RuntimeError> {
        let Some(src) = template else {
            return Ok(ChatFormat::Llama2);
        };
        let text = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or_default();
        Ok(ChatFormat::Template(Box::new(ChatTemplate::new(
            src,
            &text(tok.bos),
            &text(tok.eos),
        )?)))
    }

    /// Short name for reports (`llama-2` or `model template`).
    pub fn name(&self) -> &'static str {
        match self {
            ChatFormat::Llama2 => "llama-2 [INST]",
            ChatFormat::Template(_) => "the model's chat template",
        }
    }

    /// Prompt ids for a conversation: `turns` are (user, answer) pairs, the last answer
    /// `None` (the model answers it); `system` goes first.
    pub fn conversation_ids(
        &self,
        tok: &HiciTokenizer,
        system: Option<&str>,
        turns: &[(String, Option<String>)],
    ) -> Result<Vec<u32>, RuntimeError> {
        match self {
            ChatFormat::Llama2 => conversation_ids(tok, system, turns),
            ChatFormat::Template(_) => {
                let mut messages = Vec::new();
                if let Some(s) = system {
                    messages.push(ChatMessage::new("system", s));
                }
                for (user, answer) in turns {
                    messages.push(ChatMessage::new("user", user));
                    if let Some(a) = answer {
                        messages.push(ChatMessage::new("assistant", a));
                    }
                }
                self.messages_ids(tok, &messages)
            }
        }
    }

    /// Prompt ids for OpenAI-style messages (system/user/assistant in order).
    pub fn messages_ids(
        &self,
        tok: &HiciTokenizer,
        messages: &[ChatMessage],
    ) -> Result<Vec<u32>, RuntimeError> {
        match self {
            ChatFormat::Llama2 => {
                let mut system = None;
                let mut turns: Vec<(String, Option<String>)> = Vec::new();
                for m in messages {
                    match m.role.as_str() {
                        "system" if turns.is_empty() => system = Some(m.content.as_str()),
                        "user" => turns.push((m.content.clone(), None)),
                        "assistant" => match turns.last_mut() {
                            Some((_, a @ None)) => *a = Some(m.content.clone()),
                            _ => {
                                return Err(RuntimeError::Input(
                                    "an assistant message must follow a user message".into(),
                                ))
                            }
                        },
                        r => {
                            return Err(RuntimeError::Input(format!(
                                "message role `{r}` is not supported here (system first, then \
                                 user/assistant)"
                            )))
                        }
                    }
                }
                conversation_ids(tok, system, &turns)
            }
            ChatFormat::Template(t) => {
                let text = t.render(messages, true)?;
                // the template may write BOS itself; never add a second one
                let starts_with_bos = tok
                    .bos
                    .and_then(|b| tok.token_text(b))
                    .is_some_and(|b| !b.is_empty() && text.starts_with(&b));
                tok.encode(&text, tok.add_bos && !starts_with_bos)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_get_python_methods_raise_exception_and_special_tokens() {
        let src = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}\
                   {{ raise_exception('no system here') }}{% endif %}\
                   [{{ m['role'] | upper }}] {{ m['content'].strip() }}\n{% endfor %}\
                   {% if add_generation_prompt %}[ASSISTANT]{% endif %}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let out = t
            .render(&[ChatMessage::new("user", "  hi there \n")], true)
            .unwrap();
        assert_eq!(out, "<s>[USER] hi there\n[ASSISTANT]");
        let e = t
            .render(&[ChatMessage::new("system", "x")], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no system here"), "{e}");
        let e = ChatTemplate::new("{% for %}", "", "")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("chat template"), "{e}");
    }

    #[test]
    fn trim_and_lstrip_blocks_like_transformers() {
        let src = "{% for m in messages %}\n    {{ m.content }}\n{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let out = t
            .render(
                &[ChatMessage::new("user", "a"), ChatMessage::new("user", "b")],
                false,
            )
            .unwrap();
        assert_eq!(out, "    a\n    b\n");
    }
}
