//! [`ChatRequest`]: a chat completion built in Rust, no JSON by hand.

use serde_json::{Map, Value};

use crate::request::{Request, write_json_str, write_message};

/// A chat completion request, built step by step; [`build`](ChatRequest::build) (or
/// `Request::from`) turns it into a [`Request`].
///
/// ```
/// use keypool::ChatRequest;
/// let topic = String::from("tides");
/// let req = ChatRequest::new("openai/gpt-4o-mini")
///     .system("Answer in one sentence.")
///     .user(format!("Explain {topic}."))
///     .temperature(0.2)
///     .max_tokens(200)
///     .stop(["\n\n"])
///     .param("seed", 7)
///     .build();
/// let body: keypool::Value = keypool::serde_json::from_slice(req.body()).unwrap();
/// assert_eq!(body["messages"][1]["content"], "Explain tides.");
/// assert_eq!(body["max_tokens"], 200);
/// assert_eq!(body["seed"], 7);
/// ```
#[derive(Debug, Clone)]
pub struct ChatRequest {
    model: String,
    /// `(role, content)`, in order.
    messages: Vec<(String, String)>,
    params: Map<String, Value>,
}

impl ChatRequest {
    /// A request for `model` with no messages yet.
    pub fn new(model: impl Into<String>) -> ChatRequest {
        ChatRequest {
            model: model.into(),
            messages: Vec::new(),
            params: Map::new(),
        }
    }

    /// Appends a message with any `role`.
    pub fn message(mut self, role: impl Into<String>, content: impl Into<String>) -> Self {
        self.messages.push((role.into(), content.into()));
        self
    }

    /// Appends a `system` message.
    pub fn system(self, content: impl Into<String>) -> Self {
        self.message("system", content)
    }

    /// Appends a `user` message.
    pub fn user(self, content: impl Into<String>) -> Self {
        self.message("user", content)
    }

    /// Appends an `assistant` message (for few-shot prompts or a conversation so far).
    pub fn assistant(self, content: impl Into<String>) -> Self {
        self.message("assistant", content)
    }

    /// `temperature` (0–2). Defaults to the provider's.
    pub fn temperature(self, t: f64) -> Self {
        self.param("temperature", t)
    }

    /// `top_p`. Defaults to the provider's.
    pub fn top_p(self, p: f64) -> Self {
        self.param("top_p", p)
    }

    /// `max_tokens`: the longest completion. Defaults to the provider's. (Also used
    /// by `tpm` limits to estimate a request's tokens.)
    pub fn max_tokens(self, n: u32) -> Self {
        self.param("max_tokens", n)
    }

    /// `stop` sequences.
    pub fn stop<S: Into<String>>(self, stop: impl IntoIterator<Item = S>) -> Self {
        let v: Vec<Value> = stop.into_iter().map(|s| Value::String(s.into())).collect();
        self.param("stop", v)
    }

    /// `response_format: {"type": "json_object"}`: ask for a JSON answer.
    pub fn json_mode(self) -> Self {
        let mut f = Map::new();
        f.insert("type".into(), Value::String("json_object".into()));
        self.param("response_format", Value::Object(f))
    }

    /// `response_format` as given (e.g. a `json_schema` object).
    pub fn response_format(self, format: impl Into<Value>) -> Self {
        self.param("response_format", format)
    }

    /// Any other body field (`seed`, `tools`, `provider`, …); a later call with the
    /// same name replaces the value. `model` and `messages` are set by the builder.
    pub fn param(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        let name = name.into();
        if name != "model" && name != "messages" {
            self.params.insert(name, value.into());
        }
        self
    }

    /// The request.
    pub fn build(self) -> Request {
        // Written straight to bytes (no `serde_json::Value` tree built, then
        // serialised): `model`, `messages`, then the parameters by name.
        let mut out = Vec::with_capacity(64 + self.model.len());
        out.extend_from_slice(b"{\"model\":");
        write_json_str(&mut out, &self.model);
        out.extend_from_slice(b",\"messages\":[");
        for (i, (role, content)) in self.messages.iter().enumerate() {
            write_message(&mut out, i, role, content);
        }
        out.push(b']');
        for (name, value) in &self.params {
            out.push(b',');
            write_json_str(&mut out, name);
            out.push(b':');
            // A `Value` always serialises (map keys are strings).
            let _ = serde_json::to_writer(&mut out, value);
        }
        out.push(b'}');
        Request::raw(crate::request::DEFAULT_PATH, out)
    }
}

impl From<ChatRequest> for Request {
    fn from(c: ChatRequest) -> Request {
        c.build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The bodies written straight to bytes are the JSON the `Value` trees gave, escapes
    /// and all (compared as values: key order is free in JSON).
    #[test]
    fn bodies_written_directly_are_the_same_json() {
        let hard = "quote \" backslash \\ newline \n tab \t nul \u{0} ctrl \u{1f} é 😀 </script>";
        let r = Request::chat("m\"odel", [("user", hard), ("assistant", "")]);
        let v: Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(
            v,
            json!({"model": "m\"odel", "messages": [
                {"role": "user", "content": hard},
                {"role": "assistant", "content": ""}
            ]})
        );
        let empty = Request::chat("m", Vec::<(String, String)>::new());
        let v: Value = serde_json::from_slice(empty.body()).unwrap();
        assert_eq!(v, json!({"model": "m", "messages": []}));

        let r = ChatRequest::new("m")
            .system(hard)
            .user(String::from("u"))
            .param("seed", 1)
            .param("seed", 7)
            .param("model", "ignored")
            .param("messages", "ignored")
            .param("z\"weird", json!({"a": [1.5, null, true]}))
            .stop(["\n"])
            .build();
        let v: Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(
            v,
            json!({"model": "m", "messages": [
                {"role": "system", "content": hard},
                {"role": "user", "content": "u"}
            ], "seed": 7, "z\"weird": {"a": [1.5, null, true]}, "stop": ["\n"]})
        );
        assert_eq!(r.path(), crate::request::DEFAULT_PATH);
    }
}
