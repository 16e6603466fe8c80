/*
 * keypool C ABI bad-input test: every misuse must give the documented status (or
 * NULL/0) and a specific keypool_last_error() message — never a crash, a leak (run
 * under valgrind) or an API key in a message.
 *
 *   bad_input [base_url]   a mock server's URL; without it an unreachable one is used
 */
#define _POSIX_C_SOURCE 200809L

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "keypool.h"
#include "keypool_testing.h" /* keypool_test_panic: capi/, not the release header */

#define SECRET "sk-test-secret"

static int passed, failed;

static void report(int ok, const char *name, const char *detail) {
    if (ok) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL %s: %s\n", name, detail);
    }
}

/* The last error must be non-empty, contain `want`, and never the secret key. */
static int error_ok(const char *want, char *detail, size_t n) {
    const char *e = keypool_last_error();
    if (e == NULL) {
        snprintf(detail, n, "keypool_last_error() is NULL");
        return 0;
    }
    if (e[0] == '\0' || strstr(e, want) == NULL || strstr(e, SECRET) != NULL) {
        snprintf(detail, n, "last error \"%s\" does not contain \"%s\" (or leaks the key)", e,
                 want);
        return 0;
    }
    return 1;
}

static void check_status(const char *name, keypool_status got, keypool_status want,
                         const char *want_msg) {
    char detail[1024] = "";
    int ok;
    if (got != want) {
        snprintf(detail, sizeof detail, "status %d (%s), want %d (%s); last error: %s", (int)got,
                 keypool_status_str(got), (int)want, keypool_status_str(want),
                 keypool_last_error());
        ok = 0;
    } else if (want == KEYPOOL_OK) {
        ok = keypool_last_error()[0] == '\0';
        if (!ok) snprintf(detail, sizeof detail, "OK but last error is \"%s\"", keypool_last_error());
    } else {
        ok = error_ok(want_msg, detail, sizeof detail);
    }
    report(ok, name, detail);
}

/* For accessors that return NULL/0 on bad input. */
static void check_failed(const char *name, int returned_bad_value, const char *want_msg) {
    char detail[1024] = "returned a value other than NULL/0";
    int ok = returned_bad_value && error_ok(want_msg, detail, sizeof detail);
    report(ok, name, detail);
}

static void check(const char *name, int cond, const char *detail) { report(cond, name, detail); }

#define BODY "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}"

static int callback_calls;
static pthread_mutex_t callback_mu = PTHREAD_MUTEX_INITIALIZER;

static void count_callback(keypool_result *r, void *user_data) {
    (void)user_data;
    pthread_mutex_lock(&callback_mu);
    callback_calls++;
    pthread_mutex_unlock(&callback_mu);
    keypool_result_free(r);
}

static bool keep_chunk(const keypool_stream_event *chunk, void *user_data) {
    (void)chunk;
    (void)user_data;
    return true;
}

static int stream_chunks_seen;

static bool count_chunk(const keypool_stream_event *chunk, void *user_data) {
    (void)user_data;
    size_t n = 0;
    if (keypool_stream_event_kind(chunk) == KEYPOOL_STREAM_CHUNK && keypool_stream_event_json(chunk, &n) && n > 0) {
        pthread_mutex_lock(&callback_mu);
        stream_chunks_seen++;
        pthread_mutex_unlock(&callback_mu);
    }
    return true;
}

/* No key proofs here (`retry.prove_keys`, tested in tests/key_proof.rs): these scripted
   servers take the first connection they see to be the first request's. */
static keypool_pool *make_pool(const char *base_url, int max_concurrent, int queue,
                               int timeout_ms) {
    char config[1024];
    snprintf(config, sizeof config,
             "{\"base_url\": \"%s\", \"timeout_ms\": %d, \"queue_capacity\": %d,"
             " \"retry\": {\"max_attempts\": 1, \"prove_keys\": false},"
             " \"keys\": [{\"key\": \"" SECRET "-1\", \"label\": \"acct-a\", \"max_concurrent\": %d}]}",
             base_url, timeout_ms, queue, max_concurrent);
    keypool_pool *pool = NULL;
    keypool_status s = keypool_pool_new(config, &pool);
    if (s != KEYPOOL_OK) {
        fprintf(stderr, "make_pool: %s: %s\n", keypool_status_str(s), keypool_last_error());
        exit(1);
    }
    return pool;
}

/* A listening socket that never accepts: connections succeed, requests hang. */
static int hanging_server(char *url, size_t n) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(fd, 64) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) != 0) {
        perror("hanging_server");
        exit(1);
    }
    snprintf(url, n, "http://127.0.0.1:%d/v1", ntohs(a.sin_port));
    return fd;
}

static void config_cases(void) {
    static const struct {
        const char *name, *json, *msg;
        keypool_status want;
    } cases[] = {
        {"config: malformed JSON", "{\"keys\": [", "invalid config", KEYPOOL_CONFIG},
        {"config: empty string", "", "invalid config", KEYPOOL_CONFIG},
        {"config: keys is a number", "{\"keys\": 5}", "keys", KEYPOOL_CONFIG},
        {"config: keys is the secret as a string", "{\"keys\": \"" SECRET "\"}", "keys",
         KEYPOOL_CONFIG},
        {"config: max_concurrent is a string",
         "{\"keys\": [{\"key\": \"" SECRET "\", \"max_concurrent\": \"x\"}]}",
         "keys[0].max_concurrent", KEYPOOL_CONFIG},
        {"config: zero keys", "{\"keys\": []}", "at least one key", KEYPOOL_CONFIG},
        {"config: no keys field", "{}", "at least one key", KEYPOOL_CONFIG},
        {"config: max_concurrent 0", "{\"keys\": [{\"key\": \"" SECRET "\", \"max_concurrent\": 0}]}",
         "keys[0].max_concurrent", KEYPOOL_CONFIG},
        {"config: unknown field", "{\"colour\": 1, \"keys\": [{\"key\": \"" SECRET "\"}]}",
         "colour", KEYPOOL_CONFIG},
        {"config: unknown key field",
         "{\"keys\": [{\"key\": \"" SECRET "\", \"secret\": \"" SECRET "\"}]}", "keys[0]",
         KEYPOOL_CONFIG},
        {"config: base_url not a URL", "{\"base_url\": \"not a url\", \"keys\": [{\"key\": \"" SECRET "\"}]}",
         "base_url", KEYPOOL_CONFIG},
        {"config: base_url ftp", "{\"base_url\": \"ftp://example.com\", \"keys\": [{\"key\": \"" SECRET "\"}]}",
         "base_url", KEYPOOL_CONFIG},
        {"config: label is the key", "{\"keys\": [{\"key\": \"" SECRET "\", \"label\": \"" SECRET "\"}]}",
         "keys[0].label", KEYPOOL_CONFIG},
        {"config: key with a space", "{\"keys\": [{\"key\": \"" SECRET " x\"}]}", "keys[0].key",
         KEYPOOL_CONFIG},
        {"config: invalid UTF-8", "{\"keys\": [{\"key\": \"\xff\xfe\"}]}", "not valid UTF-8",
         KEYPOOL_INVALID_ARGUMENT},
        /* Malformed JSON is KEYPOOL_CONFIG (as documented for keypool_pool_new). */
        {"config: trailing garbage after the object",
         "{\"keys\": [{\"key\": \"" SECRET "\"}]} garbage", "invalid config", KEYPOOL_CONFIG},
        {"config: a second object after the first",
         "{\"keys\": [{\"key\": \"" SECRET "\"}]}{}", "invalid config", KEYPOOL_CONFIG},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        keypool_pool *pool = (keypool_pool *)&cases[i]; /* sentinel: must stay untouched */
        keypool_status s = keypool_pool_new(cases[i].json, &pool);
        check_status(cases[i].name, s, cases[i].want, cases[i].msg);
        if (s == KEYPOOL_OK) { /* wrongly accepted: free it so valgrind reports only that */
            keypool_pool_free(pool);
            pool = (keypool_pool *)&cases[i];
            continue;
        }
        check("config: out untouched on failure", pool == (keypool_pool *)&cases[i],
              cases[i].name);
    }
    keypool_pool *pool = NULL;
    check_status("pool_new: NULL config", keypool_pool_new(NULL, &pool), KEYPOOL_INVALID_ARGUMENT,
                 "config_json is NULL");
    check_status("pool_new: NULL out",
                 keypool_pool_new("{\"keys\": [{\"key\": \"" SECRET "\"}]}", NULL),
                 KEYPOOL_INVALID_ARGUMENT, "out is NULL");
}

static void null_handle_cases(void) {
    keypool_ticket *t = NULL;
    keypool_result *r = NULL;
    size_t len = 12345;
    check_status("shutdown: NULL pool", keypool_pool_shutdown(NULL, 0), KEYPOOL_INVALID_ARGUMENT,
                 "pool is NULL");
    check_status("submit: NULL pool", keypool_submit(NULL, BODY, &t), KEYPOOL_INVALID_ARGUMENT,
                 "pool is NULL");
    check_status("submit_path: NULL pool", keypool_submit_path(NULL, "/embeddings", BODY, &t),
                 KEYPOOL_INVALID_ARGUMENT, "pool is NULL");
    check_status("try_submit: NULL pool", keypool_try_submit(NULL, BODY, &t),
                 KEYPOOL_INVALID_ARGUMENT, "pool is NULL");
    check_status("submit_callback: NULL pool",
                 keypool_submit_callback(NULL, BODY, count_callback, NULL),
                 KEYPOOL_INVALID_ARGUMENT, "pool is NULL");
    check_status("batch: NULL pool", keypool_batch(NULL, NULL, 0, NULL), KEYPOOL_INVALID_ARGUMENT,
                 "pool is NULL");
    check_status("ticket_wait: NULL ticket", keypool_ticket_wait(NULL, 0, &r),
                 KEYPOOL_INVALID_ARGUMENT, "ticket is NULL");
    check_failed("stats_json: NULL pool", keypool_pool_stats_json(NULL) == NULL, "pool is NULL");
    check_status("result_status: NULL", keypool_result_status(NULL), KEYPOOL_INVALID_ARGUMENT,
                 "result is NULL");
    check_failed("result_http_status: NULL", keypool_result_http_status(NULL) == 0,
                 "result is NULL");
    check_failed("result_body: NULL result", keypool_result_body(NULL, &len) == NULL && len == 12345,
                 "result is NULL");
    check_failed("result_key_label: NULL", keypool_result_key_label(NULL) == NULL, "result is NULL");
    check_failed("result_attempts: NULL", keypool_result_attempts(NULL) == 0, "result is NULL");
    check_failed("result_latency_ms: NULL", keypool_result_latency_ms(NULL) == 0, "result is NULL");
    check_failed("result_error_message: NULL", keypool_result_error_message(NULL) == NULL,
                 "result is NULL");
    check_failed("result_error_code: NULL", keypool_result_error_code(NULL) == NULL,
                 "result is NULL");
    check_failed("result_blame: NULL", keypool_result_blame(NULL) == NULL, "result is NULL");
    check_failed("result_queue_ms: NULL", keypool_result_queue_ms(NULL) == 0, "result is NULL");
    check("out params untouched", t == NULL && r == NULL, "an out-parameter was written");

    /* Streams. */
    keypool_stream *st = NULL;
    keypool_stream_event *ev = NULL;
    check_status("submit_stream: NULL pool", keypool_submit_stream(NULL, BODY, &st),
                 KEYPOOL_INVALID_ARGUMENT, "pool is NULL");
    check_status("submit_stream_callback: NULL pool",
                 keypool_submit_stream_callback(NULL, BODY, keep_chunk, count_callback, NULL),
                 KEYPOOL_INVALID_ARGUMENT, "pool is NULL");
    check_status("stream_next: NULL stream", keypool_stream_next(NULL, 0, &ev),
                 KEYPOOL_INVALID_ARGUMENT, "stream is NULL");
    check_failed("stream_event_kind: NULL", keypool_stream_event_kind(NULL) == 0, "event is NULL");
    len = 12345;
    check_failed("stream_event_delta: NULL", keypool_stream_event_delta(NULL, &len) == NULL && len == 12345,
                 "event is NULL");
    check_failed("stream_event_json: NULL", keypool_stream_event_json(NULL, &len) == NULL && len == 12345,
                 "event is NULL");
    check_failed("stream_event_result: NULL", keypool_stream_event_result(NULL) == NULL,
                 "event is NULL");
    check("stream out params untouched", st == NULL && ev == NULL, "an out-parameter was written");

    /* _free(NULL) is a no-op for every _free. */
    keypool_pool_free(NULL);
    keypool_ticket_free(NULL);
    keypool_result_free(NULL);
    keypool_string_free(NULL);
    keypool_stream_free(NULL);
    keypool_stream_event_free(NULL);
    check("free(NULL) x6", 1, "");

    /* Status strings. */
    check("status_str(99)", strcmp(keypool_status_str((keypool_status)99), "unknown status") == 0,
          keypool_status_str((keypool_status)99));
    check("status_str(-1)",
          strcmp(keypool_status_str((keypool_status)-1), "unknown status") == 0, "not unknown");
    int named = 1;
    for (int s = KEYPOOL_OK; s <= KEYPOOL_BUDGET_EXHAUSTED; s++) {
        const char *str = keypool_status_str((keypool_status)s);
        if (str == NULL || str[0] == '\0' || strcmp(str, "unknown status") == 0) named = 0;
    }
    check("status_str names 0..17", named, "a known status has no name");
    check("status_str(18) unknown",
          strcmp(keypool_status_str((keypool_status)18), "unknown status") == 0, "named");
    check("status numbers fixed",
          KEYPOOL_OK == 0 && KEYPOOL_INVALID_ARGUMENT == 1 && KEYPOOL_CONFIG == 2 &&
              KEYPOOL_HTTP == 3 && KEYPOOL_TRANSPORT == 4 && KEYPOOL_TIMEOUT == 5 &&
              KEYPOOL_BUSY == 6 && KEYPOOL_CLOSED == 7 && KEYPOOL_CANCELLED == 8 &&
              KEYPOOL_PANIC == 9 && KEYPOOL_NO_USABLE_KEY == 10 && KEYPOOL_INVALID_REQUEST == 11 &&
              KEYPOOL_WOULD_DEADLOCK == 12 && KEYPOOL_SPAWN == 13 && KEYPOOL_STREAM == 14 &&
              KEYPOOL_SHARED_UNAVAILABLE == 15 && KEYPOOL_FLAGGED == 16 &&
              KEYPOOL_BUDGET_EXHAUSTED == 17,
          "a status number changed");
}

static void argument_cases(keypool_pool *pool) {
    keypool_ticket *t = NULL;
    check_status("submit: NULL body", keypool_submit(pool, NULL, &t), KEYPOOL_INVALID_ARGUMENT,
                 "body_json is NULL");
    check_status("submit: NULL out", keypool_submit(pool, BODY, NULL), KEYPOOL_INVALID_ARGUMENT,
                 "out is NULL");
    check_status("submit: invalid UTF-8 body", keypool_submit(pool, "{\"x\": \"\xc3\x28\"}", &t),
                 KEYPOOL_INVALID_ARGUMENT, "not valid UTF-8");
    check_status("submit: malformed JSON body", keypool_submit(pool, "{\"model\": ", &t),
                 KEYPOOL_INVALID_REQUEST, "not valid JSON");
    check_status("submit_path: NULL path", keypool_submit_path(pool, NULL, BODY, &t),
                 KEYPOOL_INVALID_ARGUMENT, "path is NULL");
    check_status("submit_path: NULL body", keypool_submit_path(pool, "/embeddings", NULL, &t),
                 KEYPOOL_INVALID_ARGUMENT, "body_json is NULL");
    check_status("submit_path: NULL out", keypool_submit_path(pool, "/embeddings", BODY, NULL),
                 KEYPOOL_INVALID_ARGUMENT, "out is NULL");
    check_status("submit_path: path without /", keypool_submit_path(pool, "embeddings", BODY, &t),
                 KEYPOOL_INVALID_REQUEST, "path must start with '/'");
    check_status("submit_path: path with a space", keypool_submit_path(pool, "/a b", BODY, &t),
                 KEYPOOL_INVALID_REQUEST, "path");
    check_status("submit_path: invalid UTF-8 path", keypool_submit_path(pool, "/\xff", BODY, &t),
                 KEYPOOL_INVALID_ARGUMENT, "path is not valid UTF-8");
    check_status("try_submit: NULL body", keypool_try_submit(pool, NULL, &t),
                 KEYPOOL_INVALID_ARGUMENT, "body_json is NULL");
    check_status("try_submit: NULL out", keypool_try_submit(pool, BODY, NULL),
                 KEYPOOL_INVALID_ARGUMENT, "out is NULL");
    check_status("try_submit: malformed JSON", keypool_try_submit(pool, "[1,", &t),
                 KEYPOOL_INVALID_REQUEST, "not valid JSON");
    check_status("submit_callback: NULL body",
                 keypool_submit_callback(pool, NULL, count_callback, NULL),
                 KEYPOOL_INVALID_ARGUMENT, "body_json is NULL");
    check_status("submit_callback: NULL callback", keypool_submit_callback(pool, BODY, NULL, NULL),
                 KEYPOOL_INVALID_ARGUMENT, "cb is NULL");
    check_status("submit_callback: malformed JSON",
                 keypool_submit_callback(pool, "nope", count_callback, NULL),
                 KEYPOOL_INVALID_REQUEST, "not valid JSON");
    check_status("batch: NULL bodies", keypool_batch(pool, NULL, 3, NULL), KEYPOOL_INVALID_ARGUMENT,
                 "bodies is NULL");
    const char *one[1] = {BODY};
    check_status("batch: NULL out_results", keypool_batch(pool, one, 1, NULL),
                 KEYPOOL_INVALID_ARGUMENT, "out_results is NULL");
    check_status("batch: n == 0", keypool_batch(pool, NULL, 0, NULL), KEYPOOL_OK, "");
    check("no ticket written", t == NULL, "an out-parameter was written on failure");
}

/* The error code a failed result must carry for its status (keypool_result_error_code). */
static const char *code_for(keypool_status s) {
    switch (s) {
    case KEYPOOL_INVALID_ARGUMENT: return "invalid_argument";
    case KEYPOOL_CONFIG: return "config";
    case KEYPOOL_HTTP: return "http";
    case KEYPOOL_TRANSPORT: return "transport";
    case KEYPOOL_TIMEOUT: return "timeout";
    case KEYPOOL_BUSY: return "busy";
    case KEYPOOL_CLOSED: return "closed";
    case KEYPOOL_CANCELLED: return "cancelled";
    case KEYPOOL_PANIC: return "panic";
    case KEYPOOL_NO_USABLE_KEY: return "no_usable_key";
    case KEYPOOL_INVALID_REQUEST: return "invalid_request";
    case KEYPOOL_WOULD_DEADLOCK: return "would_deadlock";
    default: return NULL;
    }
}

/* A result's status, code and message agree: OK has neither code nor message; a
   failure has the code of its status and a message. */
static int result_consistent(keypool_result *r) {
    keypool_status s = keypool_result_status(r);
    const char *code = keypool_result_error_code(r);
    const char *msg = keypool_result_error_message(r);
    if (s == KEYPOOL_OK) return code == NULL && msg == NULL;
    return code != NULL && code_for(s) != NULL && strcmp(code, code_for(s)) == 0 && msg != NULL &&
           msg[0] != '\0';
}

/* A batch with bad bodies: per-index failed results, not a failed batch. */
/* Streams against the mock: the pull form to the end, a stream freed half-read, the
   callback form, and bad arguments. Everything freed (valgrind checks). */
static void stream_cases(keypool_pool *pool) {
    keypool_stream *st = NULL;
    keypool_stream_event *ev = NULL;
    check_status("submit_stream: NULL body", keypool_submit_stream(pool, NULL, &st),
                 KEYPOOL_INVALID_ARGUMENT, "body_json is NULL");
    check_status("submit_stream: NULL out", keypool_submit_stream(pool, BODY, NULL),
                 KEYPOOL_INVALID_ARGUMENT, "out is NULL");
    check_status("submit_stream: body not an object", keypool_submit_stream(pool, "[1]", &st),
                 KEYPOOL_INVALID_REQUEST, "JSON object");
    check_status("submit_stream_callback: NULL on_chunk",
                 keypool_submit_stream_callback(pool, BODY, NULL, count_callback, NULL),
                 KEYPOOL_INVALID_ARGUMENT, "on_chunk is NULL");
    check_status("submit_stream_callback: NULL on_done",
                 keypool_submit_stream_callback(pool, BODY, keep_chunk, NULL, NULL),
                 KEYPOOL_INVALID_ARGUMENT, "on_done is NULL");

    check_status("submit_stream", keypool_submit_stream(pool, BODY, &st), KEYPOOL_OK, NULL);
    check_status("stream_next: NULL out", keypool_stream_next(st, 0, NULL),
                 KEYPOOL_INVALID_ARGUMENT, "out is NULL");
    char text[256] = "";
    size_t used = 0;
    int chunks = 0, done = 0;
    keypool_status s;
    while ((s = keypool_stream_next(st, 10000, &ev)) == KEYPOOL_OK) {
        if (keypool_stream_event_kind(ev) == KEYPOOL_STREAM_CHUNK) {
            size_t n = 0;
            const char *d = keypool_stream_event_delta(ev, &n);
            if (used + n < sizeof text) {
                memcpy(text + used, d, n);
                used += n;
                text[used] = '\0';
            }
            chunks++;
            if (keypool_stream_event_result(ev) != NULL) chunks = -1000;
        } else {
            const keypool_result *r = keypool_stream_event_result(ev);
            size_t blen = 0;
            const char *body = (const char *)keypool_result_body(r, &blen);
            done = keypool_result_status(r) == KEYPOOL_OK && strstr(body, "\"chat.completion\"") &&
                   strstr(body, "\"usage\"") && strstr(body, "echo: hi");
        }
        keypool_stream_event_free(ev);
        ev = NULL;
    }
    check("stream: chunks then one done", chunks >= 3 && done, "bad events");
    check("stream: deltas are the reply", strcmp(text, "echo: hi") == 0, text);
    check_status("stream_next after done", s, KEYPOOL_CLOSED, "ended");
    keypool_stream_free(st);

    /* Freed half-read: the request is abandoned, nothing leaks. */
    st = NULL;
    check_status("submit_stream (abandoned)",
                 keypool_submit_stream(pool,
                                       "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", "
                                       "\"content\": \"a longer prompt\"}], \"mock\": "
                                       "{\"chunk_delay_ms\": 20, \"stream_chunks\": 10}}",
                                       &st),
                 KEYPOOL_OK, NULL);
    check_status("stream_next: first event", keypool_stream_next(st, 10000, &ev), KEYPOOL_OK, NULL);
    keypool_stream_event_free(ev);
    ev = NULL;
    keypool_stream_free(st);

    /* A broken stream: a KEYPOOL_STREAM result with its code and message. */
    st = NULL;
    keypool_submit_stream(pool,
                          "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": "
                          "\"abcdefgh\"}], \"mock\": {\"stream_fault\": \"truncate\", \"fault_after\": 1}}",
                          &st);
    int broken = 0;
    while (st && keypool_stream_next(st, 10000, &ev) == KEYPOOL_OK) {
        if (keypool_stream_event_kind(ev) == KEYPOOL_STREAM_DONE) {
            const keypool_result *r = keypool_stream_event_result(ev);
            broken = keypool_result_status(r) == KEYPOOL_STREAM &&
                     strcmp(keypool_result_error_code(r), "stream") == 0 &&
                     strstr(keypool_result_error_message(r), "delivered") != NULL &&
                     strstr(keypool_result_error_message(r), SECRET) == NULL;
        }
        keypool_stream_event_free(ev);
        ev = NULL;
    }
    check("stream: truncated is KEYPOOL_STREAM", broken, "not a stream error");
    keypool_stream_free(st);

    /* The callback form. */
    pthread_mutex_lock(&callback_mu);
    int before = callback_calls;
    pthread_mutex_unlock(&callback_mu);
    check_status("submit_stream_callback",
                 keypool_submit_stream_callback(pool, BODY, count_chunk, count_callback, NULL),
                 KEYPOOL_OK, NULL);
    int got = 0;
    for (int i = 0; i < 1000 && !got; i++) {
        pthread_mutex_lock(&callback_mu);
        got = callback_calls > before;
        pthread_mutex_unlock(&callback_mu);
        if (!got) {
            struct timespec ten_ms = {0, 10 * 1000 * 1000};
            nanosleep(&ten_ms, NULL);
        }
    }
    pthread_mutex_lock(&callback_mu);
    int seen = stream_chunks_seen;
    pthread_mutex_unlock(&callback_mu);
    check("submit_stream_callback: chunks then done", got && seen >= 3, "callbacks not called");
}

static void batch_cases(keypool_pool *pool) {
    const char *bodies[4] = {BODY, NULL, "{\"content\": \"\xff\"}", "{not json"};
    keypool_result *out[4] = {NULL, NULL, NULL, NULL};
    keypool_status s = keypool_batch(pool, bodies, 4, out);
    check_status("batch: mixed bad bodies", s, KEYPOOL_OK, "");
    if (s != KEYPOOL_OK) return;
    check("batch[0] valid body is sent", keypool_result_status(out[0]) == KEYPOOL_OK,
          keypool_result_error_message(out[0]) ? keypool_result_error_message(out[0]) : "?");
    static const keypool_status want[4] = {KEYPOOL_OK, KEYPOOL_INVALID_ARGUMENT,
                                           KEYPOOL_INVALID_ARGUMENT, KEYPOOL_INVALID_REQUEST};
    static const char *const want_msg[4] = {NULL, "bodies[1] is NULL", "bodies[2] is not valid UTF-8",
                                            "bodies[3]"};
    for (int i = 1; i < 4; i++) {
        const char *m = keypool_result_error_message(out[i]);
        const char *code = keypool_result_error_code(out[i]);
        size_t len = 99;
        const uint8_t *body = keypool_result_body(out[i], &len);
        char name[64];
        snprintf(name, sizeof name, "batch[%d] failed result", i);
        check(name,
              keypool_result_status(out[i]) == want[i] && m != NULL && strstr(m, want_msg[i]) &&
                  code != NULL && code[0] && body != NULL && len == 0 &&
                  keypool_result_http_status(out[i]) == 0 &&
                  keypool_result_key_label(out[i]) != NULL &&
                  keypool_result_key_label(out[i])[0] == '\0',
              m ? m : "(no message)");
        snprintf(name, sizeof name, "batch[%d] code matches status", i);
        check(name, result_consistent(out[i]), code ? code : "(no code)");
    }
    for (int i = 0; i < 4; i++) keypool_result_free(out[i]);
}

/* Ticket lifecycle misuse: wait twice, wait on a ticket of a freed pool. */
static void ticket_cases(const char *base_url) {
    keypool_pool *pool = make_pool(base_url, 4, 64, 30000);
    keypool_ticket *t = NULL;
    keypool_result *r = NULL;
    check_status("submit: valid", keypool_submit(pool, BODY, &t), KEYPOOL_OK, "");
    if (t != NULL) {
        check_status("ticket_wait: NULL out", keypool_ticket_wait(t, 30000, NULL),
                     KEYPOOL_INVALID_ARGUMENT, "out is NULL");
        check_status("ticket_wait: first", keypool_ticket_wait(t, 30000, &r), KEYPOOL_OK, "");
        keypool_result *r2 = NULL;
        check_status("ticket_wait: twice", keypool_ticket_wait(t, 0, &r2), KEYPOOL_INVALID_ARGUMENT,
                     "already taken");
        check("ticket_wait twice: out untouched", r2 == NULL, "out written");
        keypool_result_free(r);
        keypool_ticket_free(t);
    }

    /* Tickets outlive their pool: free the pool with requests queued, then wait. */
    keypool_pool *small = make_pool(base_url, 1, 64, 30000);
    keypool_ticket *ts[8];
    int n = 0;
    for (int i = 0; i < 8; i++) {
        if (keypool_submit(small, BODY, &ts[n]) == KEYPOOL_OK) n++;
    }
    check("submit 8 to a small pool", n == 8, keypool_last_error());
    keypool_pool_free(small);
    int answered = 0;
    for (int i = 0; i < n; i++) {
        keypool_result *res = NULL;
        keypool_status s = keypool_ticket_wait(ts[i], 0, &res);
        if (s == KEYPOOL_OK) {
            keypool_status rs = keypool_result_status(res);
            if (rs == KEYPOOL_OK || rs == KEYPOOL_CANCELLED) answered++;
            keypool_result_free(res);
        }
        keypool_ticket_free(ts[i]);
    }
    check("wait on tickets of a freed pool: all answered (OK or CANCELLED)", answered == n,
          "a ticket was not answered");

    /* Shutdown twice, then every submit is refused with KEYPOOL_CLOSED. */
    check_status("shutdown: first", keypool_pool_shutdown(pool, 10000), KEYPOOL_OK, "");
    check_status("shutdown: second (idempotent)", keypool_pool_shutdown(pool, 0), KEYPOOL_OK, "");
    keypool_ticket *late = NULL;
    check_status("submit after shutdown", keypool_submit(pool, BODY, &late), KEYPOOL_CLOSED,
                 "closed");
    check_status("try_submit after shutdown", keypool_try_submit(pool, BODY, &late),
                 KEYPOOL_CLOSED, "closed");
    check_status("submit_path after shutdown", keypool_submit_path(pool, "/x", BODY, &late),
                 KEYPOOL_CLOSED, "closed");
    int before = callback_calls;
    check_status("submit_callback after shutdown",
                 keypool_submit_callback(pool, BODY, count_callback, NULL), KEYPOOL_CLOSED,
                 "closed");
    const char *one[1] = {BODY};
    keypool_result *out[1] = {NULL};
    check_status("batch after shutdown", keypool_batch(pool, one, 1, out), KEYPOOL_CLOSED,
                 "closed");
    check("no ticket/result after shutdown", late == NULL && out[0] == NULL, "out written");
    char *stats = keypool_pool_stats_json(pool);
    check("stats after shutdown", stats != NULL && strstr(stats, SECRET) == NULL, "no stats");
    keypool_string_free(stats);
    keypool_pool_free(pool);
    pthread_mutex_lock(&callback_mu);
    check("refused callbacks never called", callback_calls == before, "a callback ran");
    pthread_mutex_unlock(&callback_mu);
}

/* A server that never answers: wait timeouts, BUSY, shutdown timeout. */
static void hanging_cases(void) {
    char url[128];
    int fd = hanging_server(url, sizeof url);
    keypool_pool *pool = make_pool(url, 1, 1, 1500);
    keypool_ticket *t = NULL;
    keypool_result *r = NULL;
    check_status("submit to a hanging server", keypool_submit(pool, BODY, &t), KEYPOOL_OK, "");
    check_status("ticket_wait: timeout 0", keypool_ticket_wait(t, 0, &r), KEYPOOL_TIMEOUT,
                 "not ready");
    check_status("ticket_wait: timeout 20 ms", keypool_ticket_wait(t, 20, &r), KEYPOOL_TIMEOUT,
                 "still valid");
    check("ticket_wait timeout: out untouched", r == NULL, "out written");

    keypool_ticket *extra[16];
    int n = 0;
    keypool_status s = KEYPOOL_OK;
    while (n < 16) {
        s = keypool_try_submit(pool, BODY, &extra[n]);
        if (s != KEYPOOL_OK) break;
        n++;
    }
    check_status("try_submit: queue full", s, KEYPOOL_BUSY, "busy");

    check_status("shutdown: timeout with a request in flight", keypool_pool_shutdown(pool, 0),
                 KEYPOOL_TIMEOUT, "call keypool_pool_shutdown again");
    check_status("shutdown: retried until done", keypool_pool_shutdown(pool, 30000), KEYPOOL_OK, "");
    check_status("ticket_wait after shutdown", keypool_ticket_wait(t, 30000, &r), KEYPOOL_OK, "");
    keypool_status rs = keypool_result_status(r);
    const char *code = keypool_result_error_code(r);
    check("hung request ends in a timeout/transport result",
          (rs == KEYPOOL_TIMEOUT || rs == KEYPOOL_TRANSPORT) && code != NULL &&
              keypool_result_error_message(r) != NULL &&
              strstr(keypool_result_error_message(r), SECRET) == NULL,
          keypool_status_str(rs));
    keypool_result_free(r);
    keypool_ticket_free(t);
    int cancelled = 0;
    for (int i = 0; i < n; i++) {
        keypool_result *x = NULL;
        if (keypool_ticket_wait(extra[i], 0, &x) == KEYPOOL_OK) {
            keypool_status xs = keypool_result_status(x);
            if (xs == KEYPOOL_CANCELLED || xs == KEYPOOL_TIMEOUT || xs == KEYPOOL_TRANSPORT)
                cancelled++;
            keypool_result_free(x);
        }
        keypool_ticket_free(extra[i]);
    }
    check("queued tickets answered at shutdown", cancelled == n, "a queued ticket was not answered");
    keypool_pool_free(pool);
    close(fd);
}

/* --- A batch whose later elements are refused because the pool shut down meanwhile. */
struct closer {
    int listen_fd;
    keypool_pool *pool;
};

/* Once the first request reaches the server (the batch is past its closed check and
   sending), shuts the pool down, then cuts the connection so the request ends. */
static void *close_during_batch(void *arg) {
    struct closer *c = arg;
    int conn = accept(c->listen_fd, NULL, NULL);
    keypool_pool_shutdown(c->pool, 0);
    if (conn >= 0) close(conn);
    return NULL;
}

static void batch_closed_cases(void) {
    char url[128];
    int fd = hanging_server(url, sizeof url);
    /* One worker, a one-slot queue: at most a few elements are taken before the batch
       blocks, so the last ones are submitted after the shutdown. */
    keypool_pool *pool = make_pool(url, 1, 1, 30000);
    struct closer c = {fd, pool};
    pthread_t th;
    if (pthread_create(&th, NULL, close_during_batch, &c) != 0) {
        perror("pthread_create");
        exit(1);
    }
    enum { N = 8 };
    const char *bodies[N];
    keypool_result *out[N];
    for (int i = 0; i < N; i++) {
        bodies[i] = BODY;
        out[i] = NULL;
    }
    keypool_status s = keypool_batch(pool, bodies, N, out);
    pthread_join(th, NULL);
    check_status("batch: pool shut down during the batch", s, KEYPOOL_OK, "");
    if (s == KEYPOOL_OK) {
        int closed = 0, consistent = 0;
        for (int i = 0; i < N; i++) {
            closed += keypool_result_status(out[i]) == KEYPOOL_CLOSED;
            consistent += result_consistent(out[i]);
        }
        const char *code = keypool_result_error_code(out[N - 1]);
        check("batch: the last element was refused KEYPOOL_CLOSED",
              keypool_result_status(out[N - 1]) == KEYPOOL_CLOSED, keypool_status_str(keypool_result_status(out[N - 1])));
        check("batch: a CLOSED element's code is \"closed\"",
              closed > 0 && code != NULL && strcmp(code, "closed") == 0, code ? code : "(no code)");
        check("batch: every element's status and code agree", consistent == N, "a mismatch");
        for (int i = 0; i < N; i++) keypool_result_free(out[i]);
    }
    check_status("batch: shutdown until done", keypool_pool_shutdown(pool, 30000), KEYPOOL_OK, "");
    keypool_pool_free(pool);
    close(fd);
}

/* --- Panics: never on the host's stderr; reported to the log callback. */
struct log_seen {
    pthread_mutex_t mu;
    int errors, other;
};

static void log_callback(uint32_t level, const char *message, void *user_data) {
    struct log_seen *seen = user_data;
    pthread_mutex_lock(&seen->mu);
    if (level == KEYPOOL_LOG_ERROR && message != NULL && strstr(message, "deliberate panic") &&
        strstr(message, SECRET) == NULL)
        seen->errors++;
    else
        seen->other++;
    pthread_mutex_unlock(&seen->mu);
}

/* Runs `f` with file descriptor 2 redirected to a temporary file; returns how many bytes
   were written to it (and copies the start of them into `got`). */
static long capture_stderr(void (*f)(void *), void *arg, char *got, size_t n) {
    fflush(stderr);
    FILE *tmp = tmpfile();
    int saved = dup(2);
    if (tmp == NULL || saved < 0 || dup2(fileno(tmp), 2) < 0) {
        perror("capture_stderr");
        exit(1);
    }
    f(arg);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    struct stat st;
    fstat(fileno(tmp), &st);
    rewind(tmp);
    size_t r = fread(got, 1, n - 1, tmp);
    got[r] = '\0';
    fclose(tmp);
    return (long)st.st_size;
}

struct panic_run {
    keypool_pool *pool;
    keypool_status on_caller, on_worker;
    int caller_msg_ok;
};

static void provoke_panics(void *arg) {
    struct panic_run *p = arg;
    p->on_caller = keypool_test_panic(NULL, 0);
    p->caller_msg_ok = strstr(keypool_last_error(), "deliberate panic") != NULL;
    p->on_worker = p->pool ? keypool_test_panic(p->pool, 1) : KEYPOOL_OK;
}

static void panic_cases(const char *base_url) {
    static struct log_seen seen = {PTHREAD_MUTEX_INITIALIZER, 0, 0};
    check_status("set_log_callback", keypool_set_log_callback(log_callback, &seen), KEYPOOL_OK, "");
    struct panic_run run = {make_pool(base_url, 1, 4, 30000), KEYPOOL_OK, KEYPOOL_OK, 0};
    char got[512];
    long written = capture_stderr(provoke_panics, &run, got, sizeof got);
    check("panics: nothing written to stderr", written == 0, got);
    check("panic on the calling thread -> KEYPOOL_PANIC with its message",
          run.on_caller == KEYPOOL_PANIC && run.caller_msg_ok, keypool_status_str(run.on_caller));
    check("panic on a worker caught", run.on_worker == KEYPOOL_OK, keypool_status_str(run.on_worker));
    keypool_pool_free(run.pool);
    pthread_mutex_lock(&seen.mu);
    char detail[128];
    snprintf(detail, sizeof detail, "%d error message(s) about the panics", seen.errors);
    /* The hook reports each panic; the worker also logs the one it caught. */
    check("panics: reported to the log callback at KEYPOOL_LOG_ERROR", seen.errors >= 2, detail);
    pthread_mutex_unlock(&seen.mu);
    check_status("set_log_callback(NULL)", keypool_set_log_callback(NULL, NULL), KEYPOOL_OK, "");
    int before = seen.errors;

    /* Without a log callback the message is dropped, still not printed. */
    struct panic_run quiet = {NULL, KEYPOOL_OK, KEYPOOL_OK, 0};
    written = capture_stderr(provoke_panics, &quiet, got, sizeof got);
    check("panic without a log callback: nothing written to stderr", written == 0, got);
    check("panic without a log callback -> KEYPOOL_PANIC", quiet.on_caller == KEYPOOL_PANIC,
          keypool_status_str(quiet.on_caller));
    check("removed log callback no longer called", seen.errors == before, "it was called");
    check_status("test_panic: bad site", keypool_test_panic(NULL, 7), KEYPOOL_INVALID_ARGUMENT,
                 "site must be 0 or 1");
    check_status("test_panic: site 1 needs a pool", keypool_test_panic(NULL, 1),
                 KEYPOOL_INVALID_ARGUMENT, "pool is NULL");
}

int main(int argc, char **argv) {
    const char *base_url = argc > 1 ? argv[1] : "http://127.0.0.1:9/v1";

    config_cases();
    null_handle_cases();
    keypool_pool *pool = make_pool(base_url, 4, 64, 30000);
    argument_cases(pool);
    if (argc > 1) batch_cases(pool);
    if (argc > 1) stream_cases(pool);
    keypool_pool_free(pool);
    if (argc > 1) ticket_cases(base_url);
    hanging_cases();
    batch_closed_cases();
    panic_cases(base_url);

    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
