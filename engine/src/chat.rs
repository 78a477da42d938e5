//! Rendering a conversation into a prompt with the model's own Jinja chat template
//! (minijinja, with Python string methods), or ChatML when the model ships none.

use crate::error::{EngineError, Result};
use serde::{Deserialize, Serialize};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// "system", "user" or "assistant".
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl ChatMessage {
    /// A turn with the given role and text.
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// The template used when a model carries none.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Template instructions a render may run for itself, before any message: a real chat
/// template runs a few hundred.
const FUEL_BASE: u64 = 200_000;
/// And for each message: real templates run some tens per message.
const FUEL_PER_MESSAGE: u64 = 2_000;
/// Bytes a render may write beyond twice its messages' text (a template adds role markers
/// and a system prompt, never megabytes).
const OUTPUT_SLACK: usize = 1 << 20;

/// Renders `messages` with `template` (ChatML when `None`), ending with the assistant's
/// opening when `add_generation_prompt` is set. Templates come from model files, so they are
/// untrusted: a render that runs too long (a loop that never ends) or writes too much fails
/// with [`EngineError::Template`] rather than hanging or exhausting memory. It is CPU work:
/// async callers run it on a blocking thread.
pub fn render_chat(
    template: Option<&str>,
    messages: &[ChatMessage],
    bos_token: &str,
    eos_token: &str,
    add_generation_prompt: bool,
) -> Result<String> {
    if messages.is_empty() {
        return Err(EngineError::bad_input("a chat needs at least one message"));
    }
    let mut env = minijinja::Environment::new();
    env.set_fuel(Some(FUEL_BASE.saturating_add(
        FUEL_PER_MESSAGE.saturating_mul(messages.len() as u64),
    )));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    let tpl = env
        .template_from_str(template.unwrap_or(CHATML_TEMPLATE))
        .map_err(|e| EngineError::Template(e.to_string()))?;
    let text: usize = messages
        .iter()
        .map(|m| m.content.len() + m.role.len())
        .sum();
    let mut out = CappedText {
        text: Vec::new(),
        cap: text.saturating_mul(2).saturating_add(OUTPUT_SLACK),
        over: false,
    };
    tpl.render_captured_to(
        minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
        },
        &mut out,
    )
    .map_err(|e| match out.over {
        true => EngineError::Template(format!(
            "the chat template wrote more than {} bytes",
            out.cap
        )),
        false => EngineError::Template(e.to_string()),
    })?;
    String::from_utf8(out.text).map_err(|e| EngineError::Template(e.to_string()))
}

/// A render's output, refused past `cap` bytes.
struct CappedText {
    text: Vec<u8>,
    cap: usize,
    /// Whether a write was refused (minijinja reports only that writing failed).
    over: bool,
}

impl std::io::Write for CappedText {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len().saturating_add(buf.len()) > self.cap {
            self.over = true;
            return Err(std::io::Error::other("chat template output cap"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One render of a chat template, whole: what [`render_chat`] takes, as a value that can be
/// sent to a renderer in another process (templates come from model files, and memory is
/// the one thing fuel cannot bound: a few string doublings in a loop ask for terabytes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RenderJob {
    /// The template (ChatML when `None`).
    pub template: Option<String>,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// The model's BOS text.
    pub bos_token: String,
    /// The model's EOS text.
    pub eos_token: String,
    /// Whether the prompt ends with the assistant's opening.
    pub add_generation_prompt: bool,
}

impl RenderJob {
    /// The render of `messages` in `tok`'s chat template that a chat request prefills.
    pub fn chat(tok: &crate::tokenizer::TextTokenizer, messages: &[ChatMessage]) -> Self {
        Self {
            template: tok.chat_template().map(str::to_string),
            messages: messages.to_vec(),
            bos_token: tok.bos_text(),
            eos_token: tok.eos_text(),
            add_generation_prompt: true,
        }
    }

    /// Renders it in this process.
    pub fn render(&self) -> Result<String> {
        render_chat(
            self.template.as_deref(),
            &self.messages,
            &self.bos_token,
            &self.eos_token,
            self.add_generation_prompt,
        )
    }
}

/// Token ids of `messages` in `tok`'s chat template (ChatML when it has none), ending with
/// the assistant's opening: what a chat request prefills. Renders in this process (see
/// [`RenderJob`] for a renderer kept apart).
pub fn chat_prompt_ids(
    tok: &crate::tokenizer::TextTokenizer,
    messages: &[ChatMessage],
) -> Result<Vec<u32>> {
    tok.encode(&RenderJob::chat(tok, messages).render()?)
}
