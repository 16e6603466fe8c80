// Package keypool wraps the keypool C ABI (include/keypool.h): spread OpenAI-compatible
// LLM API requests across many API keys.
//
// The package links the installed C library through pkg-config (keypool.pc):
// install it first with `scripts/install.sh PREFIX` from the repository root, then
// build with PKG_CONFIG_PATH=PREFIX/lib/pkgconfig (and, for the shared library
// outside the loader's path, LD_LIBRARY_PATH=PREFIX/lib).
//
//	pool, err := keypool.New(`{"base_url": "https://openrouter.ai/api/v1",
//	    "keys": [{"key": "sk-...", "label": "acct-a", "max_concurrent": 4}]}`)
//	if err != nil { ... }
//	defer pool.Close()
//	results, err := pool.Batch(bodies)
//
// A Pool may be used from any number of goroutines. Close is idempotent; a finalizer
// closes a forgotten pool, but only as a safety net.
//
// Cancellation: SubmitContext, BatchContext, Ticket.WaitContext and
// SubmitStreamContext tie requests to a context.Context; Ticket.Cancel and
// Stream.Cancel cancel one request. A cancelled request still waiting is never sent;
// one on the wire has its connection closed and its key's worker freed at once, and
// its key is not blamed. Either way it ends with exactly one result (Cancelled, or
// its outcome if that came first).
//
// Observability: StatsSnapshot (typed) or Stats (JSON text); SetLogger receives
// keypool's warnings and errors, which are otherwise dropped.
package keypool

/*
#cgo pkg-config: keypool
#include <stdint.h>
#include <stdlib.h>
#include "keypool.h"

extern void goKeypoolCallback(keypool_result *result, void *user_data);
extern void goKeypoolEvent(keypool_key_event *event, void *user_data);

static inline keypool_status kp_set_event_callback(keypool_pool *pool, uintptr_t handle) {
	return keypool_pool_set_event_callback(pool, (keypool_event_callback)goKeypoolEvent, (void *)handle);
}

static inline keypool_status kp_submit_callback(keypool_pool *pool, const char *body, uintptr_t handle) {
	return keypool_submit_callback(pool, body, goKeypoolCallback, (void *)handle);
}
*/
import "C"

import (
	"runtime"
	"runtime/cgo"
	"strings"
	"sync"
	"time"
	"unsafe"
)

// Code is a keypool_status: why a call or a request failed.
type Code int

// The status codes of include/keypool.h. Their numbers never change.
const (
	OK              Code = C.KEYPOOL_OK
	InvalidArgument Code = C.KEYPOOL_INVALID_ARGUMENT
	Config          Code = C.KEYPOOL_CONFIG
	HTTP            Code = C.KEYPOOL_HTTP
	Transport       Code = C.KEYPOOL_TRANSPORT
	Timeout         Code = C.KEYPOOL_TIMEOUT
	Busy            Code = C.KEYPOOL_BUSY
	Closed          Code = C.KEYPOOL_CLOSED
	Cancelled       Code = C.KEYPOOL_CANCELLED
	Panic           Code = C.KEYPOOL_PANIC
	NoUsableKey     Code = C.KEYPOOL_NO_USABLE_KEY
	InvalidRequest  Code = C.KEYPOOL_INVALID_REQUEST
	WouldDeadlock   Code = C.KEYPOOL_WOULD_DEADLOCK
	Spawn           Code = C.KEYPOOL_SPAWN
	StreamFailed    Code = C.KEYPOOL_STREAM
	// SharedUnavailable: the config's shared limits (Redis) could not be reached and
	// shared.on_unavailable is "fail".
	SharedUnavailable Code = C.KEYPOOL_SHARED_UNAVAILABLE
	// Flagged: the server refused the request's content (moderation or guardrail);
	// no key was blamed. The result keeps the HTTP status and body.
	Flagged Code = C.KEYPOOL_FLAGGED
	// BudgetExhausted: the pool's spend cap (config max_cost) is reached; the request
	// was not sent.
	BudgetExhausted Code = C.KEYPOOL_BUDGET_EXHAUSTED
)

// String describes the code ("pool is closed", ...; "unknown status" if unknown).
func (c Code) String() string {
	return C.GoString(C.keypool_status_str(C.keypool_status(c)))
}

// Error is a failed keypool call or request.
type Error struct {
	code Code
	msg  string
}

// Code is the keypool status of the failure.
func (e *Error) Code() Code { return e.code }

// Error is the library's message; it never contains an API key.
func (e *Error) Error() string {
	if e.msg == "" {
		return "keypool: " + e.code.String()
	}
	return "keypool: " + e.msg
}

// Version is the C library's version (keypool_version()).
func Version() string { return C.GoString(C.keypool_version()) }

// call runs f on a locked OS thread so that keypool_last_error (thread-local) describes
// f's failure.
func call(f func() C.keypool_status) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	s := f()
	if s == C.KEYPOOL_OK {
		return nil
	}
	return &Error{code: Code(s), msg: C.GoString(C.keypool_last_error())}
}

func cString(what, s string) (*C.char, error) {
	if strings.IndexByte(s, 0) >= 0 {
		return nil, &Error{code: InvalidArgument, msg: what + " contains a NUL byte"}
	}
	return C.CString(s), nil
}

// Pool is a pool of API keys. Safe for concurrent use.
type Pool struct {
	mu     sync.RWMutex // held for reading by calls, for writing by Close's free
	ptr    *C.keypool_pool
	closed sync.Once
	// The event handler's handle (0: none), guarded by eventMu.
	eventMu sync.Mutex
	event   cgo.Handle
}

// New creates a pool from a JSON config (see include/keypool.h). Errors are *Error with
// Code Config (rejected config) or InvalidArgument.
func New(configJSON string) (*Pool, error) {
	cfg, err := cString("config", configJSON)
	if err != nil {
		return nil, err
	}
	defer C.free(unsafe.Pointer(cfg))
	var ptr *C.keypool_pool
	if err := call(func() C.keypool_status { return C.keypool_pool_new(cfg, &ptr) }); err != nil {
		return nil, err
	}
	p := &Pool{ptr: ptr}
	runtime.SetFinalizer(p, func(p *Pool) { p.Close() })
	return p, nil
}

// with runs f with the live C pool, or returns a Closed error.
func (p *Pool) with(f func(*C.keypool_pool) error) error {
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.ptr == nil {
		return &Error{code: Closed, msg: "pool is closed"}
	}
	err := f(p.ptr)
	runtime.KeepAlive(p)
	return err
}

// Close shuts the pool down: queued requests are answered Cancelled, in-flight ones
// finish, then the C pool is freed. Idempotent and safe to call concurrently; later
// calls on the pool return an *Error with Code Closed.
func (p *Pool) Close() error {
	p.closed.Do(func() {
		// Shut down first without the write lock, so blocked Submit/Batch calls return.
		p.mu.RLock()
		if p.ptr != nil {
			C.keypool_pool_shutdown(p.ptr, C.uint64_t(^uint64(0)))
		}
		p.mu.RUnlock()
		p.mu.Lock()
		if p.ptr != nil {
			C.keypool_pool_free(p.ptr)
			p.ptr = nil
		}
		p.mu.Unlock()
		// The event thread has stopped: the handler is never called again.
		p.eventMu.Lock()
		if p.event != 0 {
			p.event.Delete()
			p.event = 0
		}
		p.eventMu.Unlock()
		runtime.SetFinalizer(p, nil)
	})
	return nil
}

// Submit sends a chat completion body (POST /chat/completions), blocking while the
// queue is full.
func (p *Pool) Submit(body string) (*Ticket, error) {
	b, err := cString("body", body)
	if err != nil {
		return nil, err
	}
	defer C.free(unsafe.Pointer(b))
	var t *C.keypool_ticket
	err = p.with(func(ptr *C.keypool_pool) error {
		return call(func() C.keypool_status { return C.keypool_submit(ptr, b, &t) })
	})
	if err != nil {
		return nil, err
	}
	return newTicket(t), nil
}

func newTicket(t *C.keypool_ticket) *Ticket {
	tk := &Ticket{ptr: t, spent: make(chan struct{})}
	runtime.SetFinalizer(tk, func(t *Ticket) { t.Close() })
	return tk
}

// SubmitFunc sends a chat completion body; fn is called once with its result, on
// another goroutine. If SubmitFunc returns an error, fn is never called.
func (p *Pool) SubmitFunc(body string, fn func(Result)) error {
	b, err := cString("body", body)
	if err != nil {
		return err
	}
	defer C.free(unsafe.Pointer(b))
	h := cgo.NewHandle(fn)
	err = p.with(func(ptr *C.keypool_pool) error {
		return call(func() C.keypool_status { return C.kp_submit_callback(ptr, b, C.uintptr_t(h)) })
	})
	if err != nil {
		h.Delete()
	}
	return err
}

//export goKeypoolCallback
func goKeypoolCallback(r *C.keypool_result, userData unsafe.Pointer) {
	h := cgo.Handle(uintptr(userData))
	fn := h.Value().(func(Result))
	h.Delete()
	res := copyResult(r)
	C.keypool_result_free(r)
	fn(res)
}

// Batch sends every body (POST /chat/completions) and returns one Result per body, in
// input order, blocking until all are answered. A bad body gives a failed Result at its
// index, not an error; the error is for the call itself (e.g. Closed).
func (p *Pool) Batch(bodies []string) ([]Result, error) {
	n := len(bodies)
	results := make([]Result, n)
	if n == 0 {
		return results, p.with(func(*C.keypool_pool) error { return nil })
	}
	cbodies := unsafe.Slice((**C.char)(C.malloc(C.size_t(n)*C.size_t(unsafe.Sizeof((*C.char)(nil))))), n)
	defer C.free(unsafe.Pointer(&cbodies[0]))
	bad := make(map[int]error)
	for i, b := range bodies {
		cb, err := cString("body", b)
		if err != nil {
			bad[i] = err
		}
		cbodies[i] = cb // NULL for a bad body: the library answers it InvalidArgument
	}
	defer func() {
		for _, cb := range cbodies {
			C.free(unsafe.Pointer(cb))
		}
	}()
	out := make([]*C.keypool_result, n)
	err := p.with(func(ptr *C.keypool_pool) error {
		return call(func() C.keypool_status {
			return C.keypool_batch(ptr, &cbodies[0], C.size_t(n), &out[0])
		})
	})
	if err != nil {
		return nil, err
	}
	for i, r := range out {
		results[i] = copyResult(r)
		C.keypool_result_free(r)
		if e, ok := bad[i]; ok {
			results[i].ErrorMessage = e.(*Error).msg
		}
	}
	return results, nil
}

// Stats returns the pool's counters as JSON text (labels only, never keys);
// StatsSnapshot returns them decoded.
func (p *Pool) Stats() (string, error) {
	var out string
	err := p.with(func(ptr *C.keypool_pool) error {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		s := C.keypool_pool_stats_json(ptr)
		if s == nil {
			return &Error{code: InvalidArgument, msg: C.GoString(C.keypool_last_error())}
		}
		out = C.GoString(s)
		C.keypool_string_free(s)
		return nil
	})
	return out, err
}

// Prometheus returns the pool's counters in the Prometheus text exposition format
// (requests by key and outcome, in flight, queue depth, duration histograms, tokens,
// cost, key state; see docs/metrics.md), labelled with key labels, never keys. It
// returns "" once the pool is closed.
func (p *Pool) Prometheus() string {
	var out string
	_ = p.with(func(ptr *C.keypool_pool) error {
		s := C.keypool_pool_stats_prometheus(ptr)
		if s != nil {
			out = C.GoString(s)
			C.keypool_string_free(s)
		}
		return nil
	})
	return out
}

// KeyEvent is a change of one key's state.
type KeyEvent struct {
	// Kind is "cooled", "reopened", "disabled", "parked", "exhausted" or "rejoined".
	Kind string
	// KeyIndex is the key's position in the config; Label its label (never the key).
	KeyIndex int
	Label    string
	// Reason says why (disabled, parked, exhausted; cooled when known), else "".
	Reason string
	// Duration: cooled, the cooldown's length; exhausted, the time until the reset.
	Duration time.Duration
	// At is when it happened.
	At time.Time
}

// OnEvent sets the function called with every key event (a key cooled, reopened,
// disabled, parked, exhausted or rejoined), replacing any earlier one; nil removes it.
// fn runs on the pool's own event thread, one event at a time, in the order the keys
// changed; once OnEvent returns, the previous function is never called again. The
// first function set also gets the events from before it was set (the last 256).
// Close releases fn; a fn that refers to the pool keeps it alive until Close.
func (p *Pool) OnEvent(fn func(KeyEvent)) error {
	p.eventMu.Lock()
	defer p.eventMu.Unlock()
	var h cgo.Handle
	if fn != nil {
		h = cgo.NewHandle(fn)
	}
	err := p.with(func(ptr *C.keypool_pool) error {
		if fn == nil {
			return call(func() C.keypool_status { return C.keypool_pool_set_event_callback(ptr, nil, nil) })
		}
		return call(func() C.keypool_status { return C.kp_set_event_callback(ptr, C.uintptr_t(h)) })
	})
	if err != nil {
		if h != 0 {
			h.Delete()
		}
		return err
	}
	if p.event != 0 {
		p.event.Delete() // the library no longer calls it
	}
	p.event = h
	return nil
}

//export goKeypoolEvent
func goKeypoolEvent(e *C.keypool_key_event, userData unsafe.Pointer) {
	fn := cgo.Handle(uintptr(userData)).Value().(func(KeyEvent))
	ev := KeyEvent{
		Kind:     C.GoString(e.kind_name),
		KeyIndex: int(e.key_index),
		Label:    C.GoString(e.label),
		Duration: time.Duration(e.duration_ms) * time.Millisecond,
		At:       time.UnixMilli(int64(e.at_unix_ms)),
	}
	if e.reason != nil {
		ev.Reason = C.GoString(e.reason)
	}
	fn(ev)
}

// Ticket is a submitted request's result, to wait for. Wait, WaitContext and Close
// may be called from several goroutines (they take turns); Cancel may be called at
// any time from any goroutine, also while another one waits.
type Ticket struct {
	mu    sync.Mutex   // held by Wait and Close
	life  sync.RWMutex // held for reading by Cancel, for writing to free the C ticket
	ptr   *C.keypool_ticket
	spent chan struct{} // closed when the C ticket is freed
}

// Wait waits at most timeout (negative: as long as it takes) for the result. If it is
// not ready yet, returns an *Error with Code Timeout and the ticket stays valid. Once a
// result has been returned, the ticket is spent: later calls return InvalidArgument.
// A failed request is a Result whose Err() is non-nil, not an error here.
func (t *Ticket) Wait(timeout time.Duration) (*Result, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.ptr == nil {
		return nil, &Error{code: InvalidArgument, msg: "the ticket's result was already taken (or the ticket closed)"}
	}
	ms := ^uint64(0)
	if timeout >= 0 {
		ms = uint64(timeout / time.Millisecond)
	}
	var r *C.keypool_result
	if err := call(func() C.keypool_status { return C.keypool_ticket_wait(t.ptr, C.uint64_t(ms), &r) }); err != nil {
		return nil, err
	}
	res := copyResult(r)
	C.keypool_result_free(r)
	t.free()
	return &res, nil
}

// free frees the C ticket (t.mu held).
func (t *Ticket) free() {
	t.life.Lock()
	if t.ptr != nil {
		C.keypool_ticket_free(t.ptr)
		t.ptr = nil
		close(t.spent)
	}
	t.life.Unlock()
	runtime.SetFinalizer(t, nil)
}

// Cancel cancels the request (keypool_ticket_cancel): it is answered Cancelled at
// once, wherever it is. Still waiting (queued, or between retries), it is never sent;
// on the wire, its connection is closed and its key's worker freed at once, and its
// key is not blamed. Returns true if this call ended the request; false if it had
// ended already (a cancel after the end is a no-op) or the ticket is spent or closed.
// The ticket still yields exactly one result: Wait returns it (Status Cancelled if
// the cancel came first). Safe to call from any goroutine, also while another waits.
func (t *Ticket) Cancel() bool {
	t.life.RLock()
	defer t.life.RUnlock()
	if t.ptr == nil {
		return false
	}
	return bool(C.keypool_ticket_cancel(t.ptr))
}

// Close discards the ticket (the request still runs; Cancel first to stop it).
// Idempotent.
func (t *Ticket) Close() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.free()
}

// Result is one request's outcome, copied into Go memory.
type Result struct {
	Status       Code   // OK, or why the request failed
	HTTPStatus   int    // 0 if there was no HTTP response
	Body         []byte // the response body, also for HTTP errors
	KeyLabel     string // the key that served the request ("" if none)
	Attempts     int
	Latency      time.Duration
	ErrorCode    string // "http", "timeout", ...; "" on success
	ErrorMessage string // "" on success
	// Blame names whom a failure was blamed on: "request", "model", "key",
	// "account" or "server"; "" on success or when no party was.
	Blame string
	// Queue is how long the request waited before its first attempt (submit to first
	// send); Latency starts where it ends.
	Queue time.Duration
}

// Err is nil if the request succeeded, otherwise an *Error.
func (r *Result) Err() error {
	if r.Status == OK {
		return nil
	}
	return &Error{code: r.Status, msg: r.ErrorMessage}
}

func copyResult(r *C.keypool_result) Result {
	var n C.size_t
	body := C.keypool_result_body(r, &n)
	res := Result{
		Status:     Code(C.keypool_result_status(r)),
		HTTPStatus: int(C.keypool_result_http_status(r)),
		Body:       C.GoBytes(unsafe.Pointer(body), C.int(n)),
		KeyLabel:   C.GoString(C.keypool_result_key_label(r)),
		Attempts:   int(C.keypool_result_attempts(r)),
		Latency:    time.Duration(C.keypool_result_latency_ms(r)) * time.Millisecond,
		Queue:      time.Duration(C.keypool_result_queue_ms(r)) * time.Millisecond,
	}
	if m := C.keypool_result_error_message(r); m != nil {
		res.ErrorMessage = C.GoString(m)
	}
	if c := C.keypool_result_error_code(r); c != nil {
		res.ErrorCode = C.GoString(c)
	}
	if b := C.keypool_result_blame(r); b != nil {
		res.Blame = C.GoString(b)
	}
	return res
}

// Chunk is one chunk of a streamed response.
type Chunk struct {
	JSON  []byte // the chunk as the server sent it (a chat.completion.chunk)
	Delta string // the text it adds ("" for role-only, finish and usage chunks)
}

// Stream is a streamed request (SubmitStream): receive its chunks from Chunks() as they
// arrive; once that channel is closed, Result() holds the outcome — the assembled
// chat.completion body (with usage), or the error that ended the stream. Cancel or
// Close ends it early. Chunks, Result and Cancel may be used from any goroutine; Close
// is idempotent.
type Stream struct {
	chunks chan Chunk
	stop   chan struct{}
	done   chan struct{}
	result Result
	once   sync.Once
	mu     sync.Mutex // guards ptr: pump frees the C stream under it when it ends
	ptr    *C.keypool_stream
}

// SubmitStream sends a chat completion body (a JSON object) streamed ("stream": true,
// usage in the final chunk unless the body sets stream_options), blocking while the
// queue is full. A stream holds one of its key's workers until it ends.
func (p *Pool) SubmitStream(body string) (*Stream, error) {
	b, err := cString("body", body)
	if err != nil {
		return nil, err
	}
	defer C.free(unsafe.Pointer(b))
	var ptr *C.keypool_stream
	err = p.with(func(pp *C.keypool_pool) error {
		return call(func() C.keypool_status { return C.keypool_submit_stream(pp, b, &ptr) })
	})
	if err != nil {
		return nil, err
	}
	s := &Stream{
		chunks: make(chan Chunk, 16),
		stop:   make(chan struct{}),
		done:   make(chan struct{}),
		ptr:    ptr,
	}
	go s.pump(ptr)
	return s, nil
}

// pump pulls events with keypool_stream_next (blocking: Cancel and Close end the wait
// through keypool_stream_cancel) and owns the C stream: it frees it when the stream
// ends or is closed.
func (s *Stream) pump(ptr *C.keypool_stream) {
	defer close(s.done)
	defer close(s.chunks)
	defer func() {
		s.mu.Lock()
		C.keypool_stream_free(ptr) // cancels the request if it has not ended
		s.ptr = nil
		s.mu.Unlock()
	}()
	s.result = Result{Status: Cancelled, ErrorCode: "cancelled", ErrorMessage: "the stream was closed before it ended"}
	for {
		var ev *C.keypool_stream_event
		st := C.keypool_stream_next(ptr, C.uint64_t(^uint64(0)), &ev)
		if st == C.KEYPOOL_TIMEOUT {
			continue
		}
		if st != C.KEYPOOL_OK {
			s.result = Result{Status: Code(st), ErrorCode: "stream", ErrorMessage: "keypool_stream_next: " + Code(st).String()}
			return
		}
		if C.keypool_stream_event_kind(ev) == C.KEYPOOL_STREAM_DONE {
			s.result = copyResult(C.keypool_stream_event_result(ev))
			C.keypool_stream_event_free(ev)
			return
		}
		var jn, dn C.size_t
		j := C.keypool_stream_event_json(ev, &jn)
		d := C.keypool_stream_event_delta(ev, &dn)
		c := Chunk{JSON: C.GoBytes(unsafe.Pointer(j), C.int(jn)), Delta: C.GoStringN(d, C.int(dn))}
		C.keypool_stream_event_free(ev)
		select {
		case s.chunks <- c:
		case <-s.stop:
			return
		}
	}
}

// Chunks is closed after the last chunk (or when the stream is closed).
func (s *Stream) Chunks() <-chan Chunk { return s.chunks }

// Result waits for the stream to end and returns its outcome. Chunks not yet received
// are discarded.
func (s *Stream) Result() Result {
	for range s.chunks {
	}
	<-s.done
	return s.result
}

// Cancel cancels the stream's request (keypool_stream_cancel), as Ticket.Cancel does:
// waiting, it is never sent; streaming, its connection is closed at once, its worker
// freed, its key not blamed. The chunks already received stay in Chunks(); Result()
// then has Status Cancelled. Returns true if this call ended the request, false if it
// had ended already. Safe to call from any goroutine.
func (s *Stream) Cancel() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ptr == nil {
		return false
	}
	return bool(C.keypool_stream_cancel(s.ptr))
}

// Close cancels the stream if it has not ended (its connection is closed at once),
// discards the chunks not received yet and frees it. Idempotent; safe to call
// concurrently with Chunks and Result.
func (s *Stream) Close() {
	s.once.Do(func() { close(s.stop) })
	s.Cancel()
	<-s.done
}
