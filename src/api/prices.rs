//! Model prices (`prices` in the config) and the spend cap's validation: the
//! vocabulary of `max_cost`, used by the engine's `spend.rs` to estimate a response's
//! cost where the server reports none.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::Error;
use crate::request::Usage;

/// What a model costs, in dollars per million tokens (`prices` in the config). Used
/// to estimate a response's cost where the server reports no `usage.cost`.
///
/// JSON: `"prices": {"gpt-4o-mini": {"prompt": 0.15, "completion": 0.6}}`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct ModelPrice {
    /// Dollars per million prompt (input) tokens. Defaults to 0.
    pub prompt: f64,
    /// Dollars per million completion (output) tokens. Defaults to 0.
    pub completion: f64,
}

// Validation keeps both numbers finite, so equality is reflexive.
impl Eq for ModelPrice {}

impl ModelPrice {
    /// A price in dollars per million prompt and completion tokens.
    pub fn new(prompt: f64, completion: f64) -> ModelPrice {
        ModelPrice { prompt, completion }
    }

    /// The cost of `usage` at this price.
    pub(crate) fn cost(&self, usage: Usage) -> f64 {
        (usage.prompt_tokens as f64 * self.prompt
            + usage.completion_tokens as f64 * self.completion)
            / 1e6
    }
}

/// The largest price per million tokens accepted.
const MAX_PRICE: f64 = 1e6;

/// Checks `max_cost` and `prices` (the config's validation).
pub(crate) fn check(
    max_cost: Option<f64>,
    prices: &BTreeMap<String, ModelPrice>,
) -> Result<(), Error> {
    if let Some(c) = max_cost {
        if !c.is_finite() || !(0.0..=crate::credits_config::MAX_DOLLARS).contains(&c) {
            return Err(Error::config(
                "max_cost",
                format!(
                    "must be between 0 and {}",
                    crate::credits_config::MAX_DOLLARS
                ),
            ));
        }
    }
    for (model, p) in prices {
        if model.is_empty() || model.len() > 256 {
            return Err(Error::config(
                "prices",
                "model names must be 1 to 256 bytes",
            ));
        }
        for (name, v) in [("prompt", p.prompt), ("completion", p.completion)] {
            if !v.is_finite() || !(0.0..=MAX_PRICE).contains(&v) {
                return Err(Error::config(
                    "prices",
                    format!(
                        "{name} prices must be between 0 and {MAX_PRICE} (dollars per million tokens)"
                    ),
                ));
            }
        }
    }
    Ok(())
}
