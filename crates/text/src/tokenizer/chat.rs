//! Chat templates: the Jinja templates models ship (GGUF `tokenizer.chat_template`, or
//! `chat_template` in `tokenizer_config.json`), rendered with minijinja.
//!
//! The environment mirrors what Hugging Face's `apply_chat_template` offers: `trim_blocks` and
//! `lstrip_blocks`, Python string/dict methods (`.strip()`, `.items()`, … via
//! minijinja-contrib's pycompat), `raise_exception(msg)`, and the `messages`,
//! `add_generation_prompt`, `bos_token` and `eos_token` variables.

use minijinja::{Environment, ErrorKind, context};
use serde::{Deserialize, Serialize};

use super::TokenizerError;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, or whatever roles the template knows.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

const NAME: &str = "chat_template";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

fn raise_exception(msg: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are the texts templates may reference.
    ///
    /// # Errors
    /// [`TokenizerError::TemplateSyntax`] with the line of the syntax error.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TokenizerError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(NAME, source.to_owned())
            .map_err(|e| TokenizerError::TemplateSyntax {
                line: e.line(),
                reason: e.detail().map_or_else(|| e.to_string(), str::to_owned),
            })?;
        Ok(Self {
            env,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// Renders `messages`, ending with the assistant header when `add_generation_prompt`.
    ///
    /// # Errors
    /// [`TokenizerError::TemplateRender`] when the template fails or calls
    /// `raise_exception` (its message is kept).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let render_err = |e: minijinja::Error| TokenizerError::TemplateRender {
            line: e.line(),
            reason: e.detail().map_or_else(|| e.to_string(), str::to_owned),
        };
        let tmpl = self.env.get_template(NAME).map_err(render_err)?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(render_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's template, as in its GGUF metadata.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn smollm() -> ChatTemplate {
        ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").expect("compiles")
    }

    /// Ensures that without a system message SmolLM2's default one is inserted, and the
    /// generation prompt is appended on request.
    #[test]
    fn smollm2_default_system() {
        let msgs = [ChatMessage::new("user", "Hi there")];
        let want = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n";
        assert_eq!(smollm().render(&msgs, false).expect("renders"), want);
        assert_eq!(
            smollm().render(&msgs, true).expect("renders"),
            format!("{want}<|im_start|>assistant\n")
        );
    }

    /// Ensures that an explicit system message replaces the default one, and multi-turn
    /// conversations render in order.
    #[test]
    fn smollm2_with_system() {
        let msgs = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "2+2?"),
            ChatMessage::new("assistant", "4"),
            ChatMessage::new("user", "Thanks"),
        ];
        let want = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n";
        assert_eq!(smollm().render(&msgs, true).expect("renders"), want);
    }

    /// Ensures that pycompat methods, bos/eos variables and trim/lstrip blocks behave as in
    /// Hugging Face's environment.
    #[test]
    fn python_methods_and_variables() {
        let src = "{{ bos_token }}\n{% for m in messages %}\n  {{ m['content'].strip().upper() }}|\n{% endfor %}{{ eos_token }}";
        let t = ChatTemplate::new(src, "<s>", "</s>").expect("compiles");
        let out = t
            .render(&[ChatMessage::new("user", "  hi  ")], false)
            .expect("renders");
        assert_eq!(out, "<s>\n  HI|\n</s>");
    }

    /// Ensures that raise_exception surfaces the template's message as a render error.
    #[test]
    fn raise_exception_is_an_error() {
        let src =
            "{% if messages|length == 0 %}{{ raise_exception('need a message') }}{% endif %}ok";
        let t = ChatTemplate::new(src, "", "").expect("compiles");
        let err = t.render(&[], false).expect_err("raises");
        assert!(err.to_string().contains("need a message"), "{err}");
        assert_eq!(
            t.render(&[ChatMessage::new("user", "x")], false)
                .expect("renders"),
            "ok"
        );
    }

    /// Ensures that a syntax error is reported with its line number.
    #[test]
    fn syntax_error_has_line() {
        let err = ChatTemplate::new("line one\n{% if %}\n", "", "").expect_err("bad syntax");
        match err {
            TokenizerError::TemplateSyntax { line, .. } => assert_eq!(line, Some(2)),
            other => panic!("unexpected error {other:?}"),
        }
    }
}
