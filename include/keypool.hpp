// keypool.hpp — a header-only C++17 RAII wrapper over the keypool C ABI (keypool.h).
//
//   keypool::Pool pool(config_json);              // throws keypool::Error
//   keypool::Result r = pool.submit(body).wait();
//   if (r.ok()) std::cout << r.body() << "\n";
//
// Every failing call throws keypool::Error, which carries the keypool_status code and
// the library's message. Objects are move-only and free their C handle on destruction.
// A Pool may be used from several threads at once (as the C pool); a Ticket may not.
#ifndef KEYPOOL_HPP
#define KEYPOOL_HPP

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "keypool.h"

namespace keypool {

/// A failed keypool call: the status code and the library's message.
class Error : public std::runtime_error {
  public:
    Error(keypool_status code, const std::string &message)
        : std::runtime_error(std::string(keypool_status_str(code)) + ": " + message), code_(code) {}

    /// The keypool_status of the failed call (KEYPOOL_CONFIG, KEYPOOL_CLOSED, ...).
    keypool_status code() const noexcept { return code_; }

  private:
    keypool_status code_;
};

namespace detail {

inline void check(keypool_status s) {
    if (s != KEYPOOL_OK) throw Error(s, keypool_last_error());
}

struct ResultDeleter {
    void operator()(keypool_result *r) const noexcept { keypool_result_free(r); }
};
struct TicketDeleter {
    void operator()(keypool_ticket *t) const noexcept { keypool_ticket_free(t); }
};
struct PoolDeleter {
    void operator()(keypool_pool *p) const noexcept { keypool_pool_free(p); }
};
struct StringDeleter {
    void operator()(char *s) const noexcept { keypool_string_free(s); }
};

inline uint64_t to_ms(std::chrono::milliseconds d) {
    return d.count() < 0 ? 0 : static_cast<uint64_t>(d.count());
}

}  // namespace detail

/// Owns a keypool_result.
using ResultPtr = std::unique_ptr<keypool_result, detail::ResultDeleter>;

/// One request's outcome. Views it hands out live as long as the Result.
class Result {
  public:
    explicit Result(keypool_result *r) : r_(r) {
        if (!r_) throw Error(KEYPOOL_INVALID_ARGUMENT, "null keypool_result");
    }

    /// True if the request succeeded (KEYPOOL_OK).
    bool ok() const noexcept { return status() == KEYPOOL_OK; }
    /// KEYPOOL_OK, or why the request failed.
    keypool_status status() const noexcept { return keypool_result_status(r_.get()); }
    /// HTTP status; 0 if there was no HTTP response.
    uint16_t http_status() const noexcept { return keypool_result_http_status(r_.get()); }
    /// The response body (also for HTTP errors); empty if there was none.
    std::string_view body() const noexcept {
        size_t len = 0;
        const uint8_t *p = keypool_result_body(r_.get(), &len);
        return p ? std::string_view(reinterpret_cast<const char *>(p), len) : std::string_view();
    }
    /// The label of the key that served the request; empty if none did.
    std::string_view key_label() const noexcept {
        const char *l = keypool_result_key_label(r_.get());
        return l ? std::string_view(l) : std::string_view();
    }
    /// HTTP attempts made (retries included).
    uint32_t attempts() const noexcept { return keypool_result_attempts(r_.get()); }
    /// Milliseconds from the first attempt to the response.
    uint64_t latency_ms() const noexcept { return keypool_result_latency_ms(r_.get()); }
    /// Why the request failed; empty on success.
    std::string error() const {
        const char *m = keypool_result_error_message(r_.get());
        return m ? std::string(m) : std::string();
    }
    /// The fallback model that served the request (the config's "fallback_models");
    /// empty when the requested model served or the request failed.
    std::string_view fallback_model() const noexcept {
        const char *m = keypool_result_fallback_model(r_.get());
        return m ? std::string_view(m) : std::string_view();
    }
    /// Throws keypool::Error if the request failed; returns *this otherwise.
    const Result &value() const {
        if (!ok()) throw Error(status(), error());
        return *this;
    }
    /// The underlying C handle (still owned by this Result).
    const keypool_result *get() const noexcept { return r_.get(); }

  private:
    ResultPtr r_;
};

/// A submitted request's result, to wait for. Move-only.
class Ticket {
  public:
    explicit Ticket(keypool_ticket *t) : t_(t) {}

    /// Waits at most `timeout`; std::nullopt if the result is not ready yet (the ticket
    /// stays valid). Throws keypool::Error if the result was already taken.
    std::optional<Result> wait_for(std::chrono::milliseconds timeout) {
        keypool_result *r = nullptr;
        keypool_status s = keypool_ticket_wait(t_.get(), detail::to_ms(timeout), &r);
        if (s == KEYPOOL_TIMEOUT) return std::nullopt;
        detail::check(s);
        return Result(r);
    }

    /// Waits as long as it takes.
    Result wait() {
        keypool_result *r = nullptr;
        detail::check(keypool_ticket_wait(t_.get(), UINT64_MAX, &r));
        return Result(r);
    }

    /// Cancels the request (keypool_ticket_cancel): answered KEYPOOL_CANCELLED at once,
    /// never sent if still waiting, its connection closed if on the wire. True if this
    /// call ended it; false if it had ended already. Callable from any thread, also
    /// while another waits on this ticket.
    bool cancel() const noexcept { return keypool_ticket_cancel(t_.get()); }

  private:
    std::unique_ptr<keypool_ticket, detail::TicketDeleter> t_;
};

namespace detail {
struct StreamDeleter {
    void operator()(keypool_stream *s) const noexcept { keypool_stream_free(s); }
};
struct StreamEventDeleter {
    void operator()(keypool_stream_event *e) const noexcept { keypool_stream_event_free(e); }
};
}  // namespace detail

/// One event of a stream: a chunk, or the final outcome. Views it hands out live as
/// long as the event. Move-only.
class StreamEvent {
  public:
    explicit StreamEvent(keypool_stream_event *e) : e_(e) {}

    /// True for a chunk, false for the final event.
    bool is_chunk() const noexcept { return keypool_stream_event_kind(e_.get()) == KEYPOOL_STREAM_CHUNK; }
    /// The chunk's text delta (empty for the final event).
    std::string_view delta() const noexcept {
        size_t n = 0;
        const char *d = keypool_stream_event_delta(e_.get(), &n);
        return d ? std::string_view(d, n) : std::string_view();
    }
    /// The chunk's JSON text (empty for the final event).
    std::string_view json() const noexcept {
        size_t n = 0;
        const char *j = keypool_stream_event_json(e_.get(), &n);
        return j ? std::string_view(j, n) : std::string_view();
    }
    /// Final event: KEYPOOL_OK, or why the stream failed (KEYPOOL_STREAM, ...).
    keypool_status status() const noexcept {
        const keypool_result *r = keypool_stream_event_result(e_.get());
        return r ? keypool_result_status(r) : KEYPOOL_INVALID_ARGUMENT;
    }
    /// Final event: the assembled chat.completion body (or the error response's body).
    std::string_view body() const noexcept {
        size_t len = 0;
        const keypool_result *r = keypool_stream_event_result(e_.get());
        const uint8_t *p = r ? keypool_result_body(r, &len) : nullptr;
        return p ? std::string_view(reinterpret_cast<const char *>(p), len) : std::string_view();
    }
    /// Final event: why the stream failed; empty on success.
    std::string error() const {
        const keypool_result *r = keypool_stream_event_result(e_.get());
        const char *m = r ? keypool_result_error_message(r) : nullptr;
        return m ? std::string(m) : std::string();
    }
    /// Final event: the fallback model that served the stream; empty when the requested
    /// model served, the stream failed, or for a chunk.
    std::string_view fallback_model() const noexcept {
        const keypool_result *r = keypool_stream_event_result(e_.get());
        const char *m = r ? keypool_result_fallback_model(r) : nullptr;
        return m ? std::string_view(m) : std::string_view();
    }

  private:
    std::unique_ptr<keypool_stream_event, detail::StreamEventDeleter> e_;
};

/// A streamed request (Pool::submit_stream), pulled on the caller's thread. Move-only;
/// destroying it before the end cancels the request (its connection is closed).
class Stream {
  public:
    explicit Stream(keypool_stream *s) : s_(s) {}

    /// The next event, waiting at most `timeout`: std::nullopt if none arrived in time
    /// (the stream stays valid) or if the stream has ended (then `done()` is true).
    std::optional<StreamEvent> next_for(std::chrono::milliseconds timeout) {
        return next_ms(detail::to_ms(timeout));
    }
    /// The next event, waiting as long as it takes; std::nullopt once the stream ended.
    std::optional<StreamEvent> next() { return next_ms(UINT64_MAX); }
    /// True once the final event has been returned.
    bool done() const noexcept { return done_; }
    /// Cancels the request (keypool_stream_cancel); the final event then carries
    /// KEYPOOL_CANCELLED. True if this call ended it. Callable from any thread.
    bool cancel() const noexcept { return keypool_stream_cancel(s_.get()); }

  private:
    std::optional<StreamEvent> next_ms(uint64_t ms) {
        if (done_) return std::nullopt;
        keypool_stream_event *e = nullptr;
        keypool_status s = keypool_stream_next(s_.get(), ms, &e);
        if (s == KEYPOOL_TIMEOUT) return std::nullopt;
        if (s == KEYPOOL_CLOSED) {
            done_ = true;
            return std::nullopt;
        }
        detail::check(s);
        StreamEvent ev(e);
        if (!ev.is_chunk()) done_ = true;
        return ev;
    }

    std::unique_ptr<keypool_stream, detail::StreamDeleter> s_;
    bool done_ = false;
};

/// A pool of API keys. Move-only; destroying it shuts it down (see keypool_pool_free).
class Pool {
  public:
    /// Creates a pool from a JSON config; throws keypool::Error (KEYPOOL_CONFIG, ...).
    explicit Pool(const std::string &config_json) {
        keypool_pool *p = nullptr;
        detail::check(keypool_pool_new(config_json.c_str(), &p));
        p_.reset(p);
    }
    Pool(Pool &&) noexcept = default;
    Pool &operator=(Pool &&) noexcept = default;
    Pool(const Pool &) = delete;
    Pool &operator=(const Pool &) = delete;

    /// Submits a streamed chat completion (see keypool_submit_stream).
    Stream submit_stream(const std::string &body_json) {
        keypool_stream *s = nullptr;
        detail::check(keypool_submit_stream(handle(), body_json.c_str(), &s));
        return Stream(s);
    }

    /// Submits a chat completion body; blocks while the queue is full.
    Ticket submit(const std::string &body_json) {
        keypool_ticket *t = nullptr;
        detail::check(keypool_submit(handle(), body_json.c_str(), &t));
        return Ticket(t);
    }

    /// Submits to another path (e.g. "/embeddings").
    Ticket submit(const std::string &path, const std::string &body_json) {
        keypool_ticket *t = nullptr;
        detail::check(keypool_submit_path(handle(), path.c_str(), body_json.c_str(), &t));
        return Ticket(t);
    }

    /// Submits without blocking; std::nullopt if the queue is full.
    std::optional<Ticket> try_submit(const std::string &body_json) {
        keypool_ticket *t = nullptr;
        keypool_status s = keypool_try_submit(handle(), body_json.c_str(), &t);
        if (s == KEYPOOL_BUSY) return std::nullopt;
        detail::check(s);
        return Ticket(t);
    }

    /// Submits with a callback, called once with the Result on a keypool thread. If this
    /// throws, the callback is never called.
    void submit(const std::string &body_json, std::function<void(Result)> callback) {
        auto *fn = new std::function<void(Result)>(std::move(callback));
        keypool_status s = keypool_submit_callback(handle(), body_json.c_str(), &trampoline, fn);
        if (s != KEYPOOL_OK) {
            delete fn;
            detail::check(s);
        }
    }

    /// Sends every body; one Result per body, in input order. Blocks until all are done.
    std::vector<Result> batch(const std::vector<std::string> &bodies) {
        std::vector<const char *> ptrs;
        ptrs.reserve(bodies.size());
        for (const auto &b : bodies) ptrs.push_back(b.c_str());
        std::vector<keypool_result *> out(bodies.size(), nullptr);
        detail::check(keypool_batch(handle(), ptrs.data(), ptrs.size(), out.data()));
        std::vector<Result> results;
        results.reserve(out.size());
        for (keypool_result *r : out) results.emplace_back(r);
        return results;
    }

    /// The pool's counters as JSON.
    std::string stats_json() const {
        std::unique_ptr<char, detail::StringDeleter> s(keypool_pool_stats_json(handle()));
        if (!s) throw Error(KEYPOOL_INVALID_ARGUMENT, keypool_last_error());
        return std::string(s.get());
    }

    /// Shuts down, waiting at most `timeout`; throws Error(KEYPOOL_TIMEOUT) if threads
    /// are still finishing. Idempotent.
    void shutdown(std::chrono::milliseconds timeout) {
        detail::check(keypool_pool_shutdown(handle(), detail::to_ms(timeout)));
    }

    /// The underlying C handle (still owned by this Pool); NULL after a move.
    keypool_pool *get() const noexcept { return p_.get(); }

  private:
    keypool_pool *handle() const {
        if (!p_) throw Error(KEYPOOL_INVALID_ARGUMENT, "use of a moved-from keypool::Pool");
        return p_.get();
    }

    static void trampoline(keypool_result *r, void *user_data) {
        std::unique_ptr<std::function<void(Result)>> fn(
            static_cast<std::function<void(Result)> *>(user_data));
        try {
            (*fn)(Result(r));
        } catch (...) {
            // Never let an exception cross into the C library's thread.
        }
    }

    std::unique_ptr<keypool_pool, detail::PoolDeleter> p_;
};

}  // namespace keypool

#endif  // KEYPOOL_HPP
