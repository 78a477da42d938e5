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

/// Renders `messages` with `template` (ChatML when `None`), ending with the assistant's
/// opening when `add_generation_prompt` is set.
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
    tpl.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(|e| EngineError::Template(e.to_string()))
}

/// Token ids of `messages` in `tok`'s chat template (ChatML when it has none), ending with
/// the assistant's opening: what a chat request prefills.
pub fn chat_prompt_ids(
    tok: &crate::tokenizer::TextTokenizer,
    messages: &[ChatMessage],
) -> Result<Vec<u32>> {
    let text = render_chat(
        tok.chat_template(),
        messages,
        &tok.bos_text(),
        &tok.eos_text(),
        true,
    )?;
    tok.encode(&text)
}
