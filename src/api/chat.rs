//! [`ChatRequest`]: a chat completion built in Rust, no JSON by hand.

use serde_json::{Map, Value};

use crate::request::{Request, with_scratch, write_json_str, write_message};

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
        with_scratch(|out| {
            out.extend_from_slice(b"{\"model\":");
            write_json_str(out, &self.model);
            out.extend_from_slice(b",\"messages\":[");
            for (i, (role, content)) in self.messages.iter().enumerate() {
                write_message(out, i, role, content);
            }
            out.push(b']');
            for (name, value) in &self.params {
                out.push(b',');
                write_json_str(out, name);
                out.push(b':');
                // A `Value` always serialises (map keys are strings).
                let _ = serde_json::to_writer(&mut *out, value);
            }
            out.push(b'}');
            Request::raw(crate::request::DEFAULT_PATH, out)
        })
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

    /// A conversion that builds a request itself, while the outer body is being written
    /// in the thread's scratch buffer, gets a buffer of its own: both bodies are whole.
    #[test]
    fn a_body_built_inside_another_is_not_mixed_into_it() {
        struct Nested;
        impl From<Nested> for String {
            fn from(_: Nested) -> String {
                let inner = Request::chat("inner", [("user", "x".repeat(100))]);
                String::from_utf8(inner.body().to_vec()).unwrap()
            }
        }
        let outer = Request::chat("outer", [("user", Nested)]);
        let v: Value = serde_json::from_slice(outer.body()).unwrap();
        let inner: Value =
            serde_json::from_str(v["messages"][0]["content"].as_str().unwrap()).unwrap();
        assert_eq!(v["model"], "outer");
        assert_eq!(
            inner,
            json!({"model": "inner", "messages": [{"role": "user", "content": "x".repeat(100)}]})
        );
        // The scratch buffer is reused afterwards, emptied.
        let again = Request::chat("m", [("user", "y")]);
        assert_eq!(
            again.body(),
            br#"{"model":"m","messages":[{"role":"user","content":"y"}]}"#
        );
    }
}
