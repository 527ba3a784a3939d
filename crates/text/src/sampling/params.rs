//! Sampling parameters as a request states them, and their validation.
//!
//! Validation happens once, where the request enters the system; a [`ValidSamplingParams`] can
//! only be built by [`SamplingParams::validate`], so nothing downstream re-checks ranges.

use serde::{Deserialize, Serialize};

use super::SamplingError;

/// The most alternatives `top_logprobs` may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// How to pick each next token, as a request states it (OpenAI/vLLM names and semantics).
///
/// Missing fields deserialize to their [`Default`] (plain random sampling at temperature 1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature, `>= 0` and finite; `0` means greedy (argmax, ties to the lowest id).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` = off.
    pub top_k: u32,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches
    /// `top_p`; in `(0, 1]`, `1` = off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; in `[0, 1]`, `0` = off.
    pub min_p: f32,
    /// HF/CTRL repetition penalty over prompt and generated tokens: a seen token's positive logit
    /// is divided by it, a negative one multiplied; `> 0`, `1` = off.
    pub repetition_penalty: f32,
    /// OpenAI frequency penalty: subtracted from a token's logit once per time it was generated;
    /// in `[-2, 2]`.
    pub frequency_penalty: f32,
    /// OpenAI presence penalty: subtracted once from the logit of any token generated so far;
    /// in `[-2, 2]`.
    pub presence_penalty: f32,
    /// The same seed (with the same logits) gives the same tokens; `None` draws a seed from OS
    /// entropy and the clock.
    pub seed: Option<u64>,
    /// Return the chosen token's log-probability.
    pub logprobs: bool,
    /// Also return this many most likely alternatives with their log-probabilities;
    /// at most [`MAX_TOP_LOGPROBS`].
    pub top_logprobs: u32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
            logprobs: false,
            top_logprobs: 0,
        }
    }
}

/// Sampling parameters that passed [`SamplingParams::validate`] for a given vocabulary size.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidSamplingParams {
    pub(crate) params: SamplingParams,
    pub(crate) vocab_size: usize,
}

impl ValidSamplingParams {
    /// The validated parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The vocabulary size they were validated for (the logits length the sampler expects).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

impl SamplingParams {
    /// Greedy decoding: temperature 0, everything else off.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks every field's range for a model with `vocab_size` tokens.
    ///
    /// # Errors
    /// [`SamplingError::InvalidField`] naming the first bad field: negative or non-finite
    /// `temperature`; `top_p` outside `(0, 1]`; `min_p` outside `[0, 1]`; `repetition_penalty`
    /// not `> 0` and finite; `frequency_penalty` or `presence_penalty` outside `[-2, 2]`;
    /// `top_logprobs` above [`MAX_TOP_LOGPROBS`] or above the vocabulary size; and
    /// `vocab_size` 0 (reported as `"vocab_size"`).
    pub fn validate(&self, vocab_size: usize) -> Result<ValidSamplingParams, SamplingError> {
        let p = self;
        if vocab_size == 0 {
            return Err(SamplingError::field(
                "vocab_size",
                "the model has no tokens",
            ));
        }
        if !p.temperature.is_finite() || p.temperature < 0.0 {
            return Err(SamplingError::field(
                "temperature",
                format!(
                    "must be finite and >= 0 (0 = greedy), got {}",
                    p.temperature
                ),
            ));
        }
        // `!(x > 0)` rather than `x <= 0` so NaN is rejected too.
        if !(p.top_p > 0.0 && p.top_p <= 1.0) {
            return Err(SamplingError::field(
                "top_p",
                format!("must be in (0, 1] (1 = off), got {}", p.top_p),
            ));
        }
        if !(0.0..=1.0).contains(&p.min_p) {
            return Err(SamplingError::field(
                "min_p",
                format!("must be in [0, 1] (0 = off), got {}", p.min_p),
            ));
        }
        if !(p.repetition_penalty > 0.0 && p.repetition_penalty.is_finite()) {
            return Err(SamplingError::field(
                "repetition_penalty",
                format!(
                    "must be finite and > 0 (1 = off), got {}",
                    p.repetition_penalty
                ),
            ));
        }
        for (field, v) in [
            ("frequency_penalty", p.frequency_penalty),
            ("presence_penalty", p.presence_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(SamplingError::field(
                    field,
                    format!("must be in [-2, 2] (0 = off), got {v}"),
                ));
            }
        }
        if p.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(SamplingError::field(
                "top_logprobs",
                format!("must be at most {MAX_TOP_LOGPROBS}, got {}", p.top_logprobs),
            ));
        }
        if p.top_logprobs as usize > vocab_size {
            return Err(SamplingError::field(
                "top_logprobs",
                format!(
                    "must be at most the vocabulary size {vocab_size}, got {}",
                    p.top_logprobs
                ),
            ));
        }
        Ok(ValidSamplingParams {
            params: self.clone(),
            vocab_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(p: SamplingParams) -> &'static str {
        match p.validate(100) {
            Err(e) => e.field_name(),
            Ok(_) => "<accepted>",
        }
    }

    /// Ensures that the defaults and greedy preset are valid and mean what they say.
    #[test]
    fn defaults_and_greedy_validate() {
        let d = SamplingParams::default();
        assert_eq!(d.temperature, 1.0);
        assert_eq!((d.top_k, d.top_p, d.min_p), (0, 1.0, 0.0));
        assert!(d.validate(10).is_ok());
        let g = SamplingParams::greedy();
        assert_eq!(g.temperature, 0.0);
        let v = g.validate(10).expect("greedy is valid");
        assert_eq!(v.vocab_size(), 10);
        assert_eq!(v.params(), &g);
    }

    /// Ensures that each out-of-range field is rejected under its own name.
    #[test]
    fn each_bad_field_is_named() {
        let base = SamplingParams::default;
        let cases: Vec<(SamplingParams, &str)> = vec![
            (
                SamplingParams {
                    temperature: -0.1,
                    ..base()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..base()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::INFINITY,
                    ..base()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..base()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_p: 1.01,
                    ..base()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_p: f32::NAN,
                    ..base()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    min_p: -0.01,
                    ..base()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    min_p: 1.5,
                    ..base()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    min_p: f32::NAN,
                    ..base()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..base()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: -1.0,
                    ..base()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: f32::NAN,
                    ..base()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    frequency_penalty: 2.5,
                    ..base()
                },
                "frequency_penalty",
            ),
            (
                SamplingParams {
                    frequency_penalty: -2.01,
                    ..base()
                },
                "frequency_penalty",
            ),
            (
                SamplingParams {
                    presence_penalty: 3.0,
                    ..base()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    presence_penalty: f32::NAN,
                    ..base()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    top_logprobs: 21,
                    ..base()
                },
                "top_logprobs",
            ),
        ];
        for (p, want) in cases {
            assert_eq!(field_of(p.clone()), want, "{p:?}");
        }
        assert_eq!(
            SamplingParams::default()
                .validate(0)
                .map(|_| ())
                .map_err(|e| e.field_name()),
            Err("vocab_size")
        );
        assert_eq!(
            SamplingParams {
                top_logprobs: 5,
                ..base()
            }
            .validate(4)
            .map(|_| ())
            .map_err(|e| e.field_name()),
            Err("top_logprobs")
        );
    }

    /// Ensures that the edges of every accepted range are accepted.
    #[test]
    fn range_edges_are_accepted() {
        let base = SamplingParams::default;
        for p in [
            SamplingParams {
                temperature: 0.0,
                ..base()
            },
            SamplingParams {
                top_p: 1.0,
                ..base()
            },
            SamplingParams {
                top_p: 1e-6,
                ..base()
            },
            SamplingParams {
                min_p: 0.0,
                ..base()
            },
            SamplingParams {
                min_p: 1.0,
                ..base()
            },
            SamplingParams {
                repetition_penalty: 1e-3,
                ..base()
            },
            SamplingParams {
                frequency_penalty: -2.0,
                presence_penalty: 2.0,
                ..base()
            },
            SamplingParams {
                top_logprobs: 20,
                logprobs: true,
                ..base()
            },
            SamplingParams {
                top_k: u32::MAX,
                ..base()
            },
        ] {
            assert_eq!(field_of(p.clone()), "<accepted>", "{p:?}");
        }
    }

    /// Ensures that the error message names the field and the accepted range.
    #[test]
    fn error_message_names_field_and_range() {
        let e = SamplingParams {
            top_p: 2.0,
            ..SamplingParams::default()
        }
        .validate(10)
        .expect_err("top_p 2 is invalid");
        let msg = e.to_string();
        assert!(msg.contains("top_p") && msg.contains("(0, 1]"), "{msg}");
    }

    /// Ensures that missing JSON fields take their defaults and a full round trip is lossless.
    #[test]
    fn serde_defaults_and_round_trip() {
        let p: SamplingParams =
            serde_json::from_str(r#"{"temperature":0.5,"seed":7}"#).expect("parses");
        assert_eq!(p.temperature, 0.5);
        assert_eq!(p.seed, Some(7));
        assert_eq!(p.top_p, 1.0);
        assert_eq!(p.repetition_penalty, 1.0);
        let json = serde_json::to_string(&p).expect("serializes");
        let back: SamplingParams = serde_json::from_str(&json).expect("parses back");
        assert_eq!(back, p);
    }
}
