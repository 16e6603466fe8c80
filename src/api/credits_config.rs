//! The `credits` section of the configuration: [`CreditsConfig`], and what a sane dollar
//! amount from a server is ([`dollars`]); the checks themselves are `engine::credits`.

use serde::Deserialize;

/// The largest dollar amount believed from a server (per `usage.cost` and per balance):
/// larger values are ignored as garbage.
pub(crate) const MAX_DOLLARS: f64 = 1e9;

/// Credit checks for providers that report a key's balance at `GET {base_url}/key`
/// (OpenRouter). Off by default.
///
/// JSON: `"credits": {"check": true, "floor": 0.5, "recheck_cost": 1.0, "recheck_ms": 300000}`.
///
/// `#[non_exhaustive]`: start from [`CreditsConfig::default`] and use the setters.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct CreditsConfig {
    /// Check each key's balance before its first request and after a 402 on it.
    /// Defaults to false.
    pub check: bool,
    /// A key whose `limit_remaining` (dollars) is at or below this is parked.
    /// Defaults to 0.
    pub floor: f64,
    /// Check a key again after this many dollars of summed `usage.cost` since its last
    /// check; 0 means never. Defaults to 0.
    pub recheck_cost: f64,
    /// A key parked for its credit (at its floor, a 402, OpenAI's `insufficient_quota`)
    /// is checked again at most this often, only while requests wait, and rejoins the
    /// rotation when its balance is above the floor (its account was topped up); 0
    /// means never. Defaults to 300,000 (5 minutes).
    pub recheck_ms: u64,
}

// Validation keeps both numbers finite, so equality is reflexive.
impl Eq for CreditsConfig {}

impl Default for CreditsConfig {
    fn default() -> CreditsConfig {
        CreditsConfig {
            check: false,
            floor: 0.0,
            recheck_cost: 0.0,
            recheck_ms: 300_000,
        }
    }
}

impl CreditsConfig {
    /// Checks enabled, with this floor in dollars.
    pub fn with_floor(floor: f64) -> CreditsConfig {
        CreditsConfig {
            check: true,
            floor,
            ..CreditsConfig::default()
        }
    }

    /// Turns the checks on or off.
    pub fn check(mut self, on: bool) -> CreditsConfig {
        self.check = on;
        self
    }

    /// How often a parked key's credit is checked again, in milliseconds (0: never).
    pub fn recheck_ms(mut self, ms: u64) -> CreditsConfig {
        self.recheck_ms = ms;
        self
    }

    /// The floor in dollars at or below which a key is parked.
    pub fn floor(mut self, floor: f64) -> CreditsConfig {
        self.floor = floor;
        self
    }

    /// Re-check after this many dollars of summed `usage.cost` (0: never).
    pub fn recheck_cost(mut self, dollars: f64) -> CreditsConfig {
        self.recheck_cost = dollars;
        self
    }

    /// The rule the config validation applies; `Err` says what is wrong.
    pub(crate) fn problem(&self) -> Option<(&'static str, String)> {
        for (field, v) in [
            ("credits.floor", self.floor),
            ("credits.recheck_cost", self.recheck_cost),
        ] {
            if !v.is_finite() || !(0.0..=MAX_DOLLARS).contains(&v) {
                return Some((field, format!("must be between 0 and {MAX_DOLLARS}")));
            }
        }
        if self.recheck_ms > crate::config::MAX_DURATION_MS {
            return Some((
                "credits.recheck_ms",
                format!("must be at most {}", crate::config::MAX_DURATION_MS),
            ));
        }
        None
    }
}

/// A sane dollar amount from a server, or `None`: finite, non-negative, plausible.
pub(crate) fn dollars(v: f64) -> Option<f64> {
    (v.is_finite() && (0.0..=MAX_DOLLARS).contains(&v)).then_some(v)
}
