/*
 * keypool C ABI callback test: what a completion callback may call.
 *
 * A callback runs on a keypool thread. A call there that would wait for the pool
 * (keypool_submit on a full queue, keypool_batch, keypool_ticket_wait with a timeout,
 * keypool_pool_shutdown) must return KEYPOOL_WOULD_DEADLOCK at once instead of
 * deadlocking the pool; the non-blocking calls keep working, and every request is still
 * answered. Callbacks of cancelled requests run on a keypool thread, never on the thread
 * that shuts the pool down.
 *
 *   callbacks <base_url> [<capacity_url>]
 *
 * base_url is a mock server's URL (run under valgrind by run-ffi-tests.sh); the
 * optional capacity_url a mock started with `--key-capacity 1 --latency-ms 100`, where
 * the key event callback and the Prometheus text are checked (event_cases).
 *
 * Synchronisation is by mutex + condition variable with a deadline, so a deadlock
 * fails the test instead of hanging it.
 */
#define _POSIX_C_SOURCE 200809L

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "keypool.h"

#define BODY "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}"
#define PATIENCE_S 20

static int passed, failed;

static void check(const char *name, int ok, const char *detail) {
    if (ok) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL %s: %s\n", name, detail ? detail : "");
    }
}

static void check_status(const char *name, keypool_status got, keypool_status want,
                         const char *want_msg) {
    char detail[1024];
    const char *e = keypool_last_error();
    int ok = got == want && (want_msg == NULL || strstr(e, want_msg) != NULL);
    snprintf(detail, sizeof detail, "status %d (%s), want %d (%s); last error: %s", (int)got,
             keypool_status_str(got), (int)want, keypool_status_str(want), e);
    check(name, ok, detail);
}

/* --- a flag with a deadline ------------------------------------------------------- */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;

static void set_flag(int *flag, int value) {
    pthread_mutex_lock(&mu);
    *flag = value;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
}

static void add_flag(int *flag) {
    pthread_mutex_lock(&mu);
    (*flag)++;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
}

/* Waits until *flag >= want; returns 0 after PATIENCE_S seconds. */
static int wait_flag(int *flag, int want) {
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += PATIENCE_S;
    int ok = 1;
    pthread_mutex_lock(&mu);
    while (*flag < want) {
        if (pthread_cond_timedwait(&cv, &mu, &deadline) != 0) {
            ok = *flag >= want;
            break;
        }
    }
    pthread_mutex_unlock(&mu);
    return ok;
}

static keypool_pool *make_pool(const char *base_url, int queue, int timeout_ms) {
    char config[1024];
    snprintf(config, sizeof config,
             "{\"base_url\": \"%s\", \"timeout_ms\": %d, \"queue_capacity\": %d,"
             /* no key proofs: a hanging server's first connection is the request's */
             " \"retry\": {\"max_attempts\": 1, \"prove_keys\": false},"
             " \"keys\": [{\"key\": \"sk-test-cb\", \"label\": \"acct-a\", \"max_concurrent\": 1}]}",
             base_url, timeout_ms, queue);
    keypool_pool *pool = NULL;
    keypool_status s = keypool_pool_new(config, &pool);
    if (s != KEYPOOL_OK) {
        fprintf(stderr, "make_pool: %s: %s\n", keypool_status_str(s), keypool_last_error());
        exit(1);
    }
    return pool;
}

static void never_called(keypool_result *r, void *user_data) {
    int *calls = user_data;
    add_flag(calls);
    keypool_result_free(r);
}

/* --- 1. blocking calls from a callback on a full queue ------------------------------- */

struct blocking_case {
    keypool_pool *pool;
    int entered, full, done, refused_calls;
    keypool_ticket *pending;
    keypool_status first, submit_room, wait_long, wait_zero, submit, submit_path,
        submit_callback, try_submit, batch;
    int wait_out_untouched, batch_out_untouched, stats_ok, wait_msg_ok, submit_msg_ok;
};

static void blocking_callback(keypool_result *r, void *user_data) {
    struct blocking_case *c = user_data;
    c->first = keypool_result_status(r);
    keypool_result_free(r);

    /* Room in the queue: a blocking submit is fine from a callback. */
    c->submit_room = keypool_submit(c->pool, BODY, &c->pending);
    keypool_result *out = NULL;
    /* The only worker is this thread: the result cannot come, so no waiting. */
    c->wait_long = keypool_ticket_wait(c->pending, 3600 * 1000, &out);
    c->wait_msg_ok = strstr(keypool_last_error(), "still valid") != NULL;
    c->wait_zero = keypool_ticket_wait(c->pending, 0, &out);
    c->wait_out_untouched = out == NULL;
    set_flag(&c->entered, 1);
    if (!wait_flag(&c->full, 1)) return; /* the main thread reports it */

    keypool_ticket *t = NULL;
    c->submit = keypool_submit(c->pool, BODY, &t);
    c->submit_msg_ok = strstr(keypool_last_error(), "callback") != NULL;
    c->submit_path = keypool_submit_path(c->pool, "/chat/completions", BODY, &t);
    c->submit_callback = keypool_submit_callback(c->pool, BODY, never_called, &c->refused_calls);
    c->try_submit = keypool_try_submit(c->pool, BODY, &t);
    const char *one[1] = {BODY};
    keypool_result *results[1] = {NULL};
    c->batch = keypool_batch(c->pool, one, 1, results);
    c->batch_out_untouched = results[0] == NULL && t == NULL;
    char *stats = keypool_pool_stats_json(c->pool);
    c->stats_ok = stats != NULL && strstr(stats, "\"submitted\"") != NULL;
    keypool_string_free(stats);
    set_flag(&c->done, 1);
}

static void blocking_cases(const char *url) {
    static struct blocking_case c;
    memset(&c, 0, sizeof c);
    c.pool = make_pool(url, 2, 30000);
    check_status("submit_callback", keypool_submit_callback(c.pool, BODY, blocking_callback, &c),
                 KEYPOOL_OK, NULL);
    if (!wait_flag(&c.entered, 1)) {
        check("callback: keypool_ticket_wait returned promptly", 0, "deadlocked: giving up");
        exit(1); /* the pool cannot be freed: its only worker is stuck */
    }
    /* The worker is in the callback: the queue stays full once filled. */
    keypool_ticket *fill[8];
    int n = 0;
    while (n < 8 && keypool_try_submit(c.pool, BODY, &fill[n]) == KEYPOOL_OK) n++;
    check("queue filled", n < 8, "try_submit never returned BUSY");
    set_flag(&c.full, 1);
    if (!wait_flag(&c.done, 1)) {
        check("callback: blocking calls returned promptly", 0, "deadlocked: giving up");
        exit(1);
    }
    check("first request answered OK", c.first == KEYPOOL_OK, keypool_status_str(c.first));
    check("callback: submit with room in the queue is OK", c.submit_room == KEYPOOL_OK,
          keypool_status_str(c.submit_room));
    check("callback: ticket_wait(3600 s) on a pending result -> WOULD_DEADLOCK",
          c.wait_long == KEYPOOL_WOULD_DEADLOCK && c.wait_msg_ok, keypool_status_str(c.wait_long));
    check("callback: ticket_wait(0) -> TIMEOUT", c.wait_zero == KEYPOOL_TIMEOUT,
          keypool_status_str(c.wait_zero));
    check("callback: ticket_wait out untouched", c.wait_out_untouched, "out written");
    check("callback: submit on a full queue -> WOULD_DEADLOCK",
          c.submit == KEYPOOL_WOULD_DEADLOCK && c.submit_msg_ok, keypool_status_str(c.submit));
    check("callback: submit_path on a full queue -> WOULD_DEADLOCK",
          c.submit_path == KEYPOOL_WOULD_DEADLOCK, keypool_status_str(c.submit_path));
    check("callback: submit_callback on a full queue -> WOULD_DEADLOCK",
          c.submit_callback == KEYPOOL_WOULD_DEADLOCK, keypool_status_str(c.submit_callback));
    check("callback: try_submit on a full queue -> BUSY", c.try_submit == KEYPOOL_BUSY,
          keypool_status_str(c.try_submit));
    check("callback: batch -> WOULD_DEADLOCK", c.batch == KEYPOOL_WOULD_DEADLOCK,
          keypool_status_str(c.batch));
    check("callback: refused calls wrote no out-parameter", c.batch_out_untouched, "written");
    check("callback: stats_json works", c.stats_ok, "no stats");
    check("status number", KEYPOOL_WOULD_DEADLOCK == 12, "renumbered");
    check("status_str(WOULD_DEADLOCK)",
          strstr(keypool_status_str(KEYPOOL_WOULD_DEADLOCK), "deadlock") != NULL,
          keypool_status_str(KEYPOOL_WOULD_DEADLOCK));

    /* Everything accepted is answered once the callback has returned. */
    int ok = 0;
    keypool_result *r = NULL;
    if (c.pending && keypool_ticket_wait(c.pending, UINT64_MAX, &r) == KEYPOOL_OK) {
        ok += keypool_result_status(r) == KEYPOOL_OK;
        keypool_result_free(r);
    }
    keypool_ticket_free(c.pending);
    for (int i = 0; i < n; i++) {
        r = NULL;
        if (keypool_ticket_wait(fill[i], UINT64_MAX, &r) == KEYPOOL_OK) {
            ok += keypool_result_status(r) == KEYPOOL_OK;
            keypool_result_free(r);
        }
        keypool_ticket_free(fill[i]);
    }
    check("every accepted request answered OK", ok == n + 1, "a request was not answered");
    check_status("shutdown from the main thread", keypool_pool_shutdown(c.pool, UINT64_MAX),
                 KEYPOOL_OK, NULL);
    check("a refused submit_callback never calls back", c.refused_calls == 0, "it was called");
    keypool_pool_free(c.pool);
}

/* --- 2. a ready ticket and shutdown from a callback ---------------------------------- */

struct shutdown_case {
    keypool_pool *pool;
    keypool_ticket *ready;
    keypool_status ready_wait, ready_result, shutdown, submit_after;
    int shutdown_msg_ok, done;
};

static void shutdown_callback(keypool_result *r, void *user_data) {
    struct shutdown_case *c = user_data;
    keypool_result_free(r);
    /* One worker, in order: the earlier request was answered before this callback. */
    keypool_result *out = NULL;
    c->ready_wait = keypool_ticket_wait(c->ready, 60000, &out);
    c->ready_result = out ? keypool_result_status(out) : KEYPOOL_PANIC;
    keypool_result_free(out);
    c->shutdown = keypool_pool_shutdown(c->pool, UINT64_MAX);
    c->shutdown_msg_ok = strstr(keypool_last_error(), "shutdown has started") != NULL;
    keypool_ticket *t = NULL;
    c->submit_after = keypool_submit(c->pool, BODY, &t);
    set_flag(&c->done, 1);
}

static void shutdown_cases(const char *url) {
    static struct shutdown_case c;
    memset(&c, 0, sizeof c);
    c.pool = make_pool(url, 8, 30000);
    check_status("submit (ticket)", keypool_submit(c.pool, BODY, &c.ready), KEYPOOL_OK, NULL);
    check_status("submit_callback (shutdown)",
                 keypool_submit_callback(c.pool, BODY, shutdown_callback, &c), KEYPOOL_OK, NULL);
    if (!wait_flag(&c.done, 1)) {
        check("callback: shutdown returned promptly", 0, "deadlocked: giving up");
        exit(1);
    }
    check("callback: ticket_wait on an answered ticket -> OK",
          c.ready_wait == KEYPOOL_OK && c.ready_result == KEYPOOL_OK,
          keypool_status_str(c.ready_wait));
    check("callback: shutdown -> WOULD_DEADLOCK, shutdown started",
          c.shutdown == KEYPOOL_WOULD_DEADLOCK && c.shutdown_msg_ok, keypool_status_str(c.shutdown));
    check("callback: submit after its shutdown -> CLOSED", c.submit_after == KEYPOOL_CLOSED,
          keypool_status_str(c.submit_after));
    check_status("shutdown again from the main thread waits", keypool_pool_shutdown(c.pool, 30000),
                 KEYPOOL_OK, NULL);
    keypool_ticket_free(c.ready);
    keypool_pool_free(c.pool);
}

/* --- 3. callbacks of cancelled requests: on a keypool thread -------------------------- */

struct cancel_case {
    pthread_t main_thread;
    keypool_ticket *hung;
    int calls, on_main, cancelled, wait_would_deadlock;
};

static void cancel_callback(keypool_result *r, void *user_data) {
    struct cancel_case *c = user_data;
    int cancelled = keypool_result_status(r) == KEYPOOL_CANCELLED;
    keypool_result_free(r);
    int on_main = pthread_equal(pthread_self(), c->main_thread);
    /* Wherever this runs, it is a keypool thread: waiting is refused. A ticket must not
       be used from two threads at once, hence its own mutex. */
    static pthread_mutex_t hung_mu = PTHREAD_MUTEX_INITIALIZER;
    keypool_result *out = NULL;
    pthread_mutex_lock(&hung_mu);
    keypool_status w = keypool_ticket_wait(c->hung, 60000, &out);
    pthread_mutex_unlock(&hung_mu);
    keypool_result_free(out);
    pthread_mutex_lock(&mu);
    c->cancelled += cancelled;
    c->on_main += on_main;
    c->wait_would_deadlock += w == KEYPOOL_WOULD_DEADLOCK;
    c->calls++;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
}

static void cancel_cases(void) {
    /* A server that accepts connections and never answers. */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(fd, 64) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) != 0) {
        perror("hanging server");
        exit(1);
    }
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/v1", ntohs(a.sin_port));
    static struct cancel_case c;
    memset(&c, 0, sizeof c);
    c.main_thread = pthread_self();
    /* The hung request times out after 4 s: long enough (even under valgrind) for the
       cancelled callbacks to find it still unanswered. */
    keypool_pool *pool = make_pool(url, 8, 4000);
    check_status("submit (hangs)", keypool_submit(pool, BODY, &c.hung), KEYPOOL_OK, NULL);
    /* Only once it is on the wire are the next two queued behind it (else shutdown could
       cancel all three before the dispatcher takes the first). */
    int conn = accept(fd, NULL, NULL);
    check("hung request reached the server", conn >= 0, "accept failed");
    for (int i = 0; i < 2; i++)
        check_status("submit_callback (to be cancelled)",
                     keypool_submit_callback(pool, BODY, cancel_callback, &c), KEYPOOL_OK, NULL);
    check_status("shutdown(0) with one in flight", keypool_pool_shutdown(pool, 0), KEYPOOL_TIMEOUT,
                 NULL);
    check("cancelled callbacks ran", wait_flag(&c.calls, 2), "not within the deadline");
    check("cancelled callbacks got KEYPOOL_CANCELLED", c.cancelled == 2, "another status");
    check("cancelled callbacks ran on a keypool thread, not the shutdown caller", c.on_main == 0,
          "ran on the thread calling keypool_pool_shutdown");
    check("...which refuses to wait (WOULD_DEADLOCK)", c.wait_would_deadlock == 2, "it waited");
    check_status("shutdown until done", keypool_pool_shutdown(pool, 30000), KEYPOOL_OK, NULL);
    keypool_result *r = NULL;
    check_status("hung request answered", keypool_ticket_wait(c.hung, 30000, &r), KEYPOOL_OK,
                 NULL);
    keypool_result_free(r);
    keypool_ticket_free(c.hung);
    keypool_pool_free(pool);
    if (conn >= 0) close(conn);
    close(fd);
}

/* --- key events and metrics -------------------------------------------------------- */
#define MAX_EVENTS 64

struct events {
    int n;
    uint32_t kinds[MAX_EVENTS];
    int label_ok, names_ok, secret_seen;
};

static void on_event(const keypool_key_event *e, void *user_data) {
    struct events *ev = user_data;
    pthread_mutex_lock(&mu);
    if (ev->n < MAX_EVENTS) ev->kinds[ev->n] = e->kind;
    ev->label_ok &= e->label != NULL && strcmp(e->label, "acct-ev") == 0;
    ev->names_ok &= e->kind_name != NULL &&
                    ((e->kind == KEYPOOL_EVENT_COOLED && strcmp(e->kind_name, "cooled") == 0) ||
                     (e->kind == KEYPOOL_EVENT_REOPENED && strcmp(e->kind_name, "reopened") == 0));
    if (e->reason != NULL && strstr(e->reason, "SECRET") != NULL) ev->secret_seen = 1;
    ev->n++;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
}

/* One key (two workers) at a mock taking one request per key at a time: the second
 * request in flight gets a 429, the key cools (cooled), and after the cooldown a trial
 * request succeeds (reopened). */
static void event_cases(const char *capacity_url) {
    char config[1024];
    snprintf(config, sizeof config,
             "{\"base_url\": \"%s\", \"retry\": {\"default_cooldown_ms\": 200},"
             " \"keys\": [{\"key\": \"sk-test-SECRET-ev\", \"label\": \"acct-ev\","
             " \"max_concurrent\": 2}]}",
             capacity_url);
    keypool_pool *pool = NULL;
    check_status("events: pool_new", keypool_pool_new(config, &pool), KEYPOOL_OK, NULL);
    if (pool == NULL) return;
    check_status("events: NULL pool", keypool_pool_set_event_callback(NULL, on_event, NULL),
                 KEYPOOL_INVALID_ARGUMENT, "pool is NULL");
    struct events ev = {0, {0}, 1, 1, 0};
    check_status("events: set callback", keypool_pool_set_event_callback(pool, on_event, &ev),
                 KEYPOOL_OK, NULL);
    const char *bodies[4] = {BODY, BODY, BODY, BODY};
    keypool_result *results[4] = {NULL, NULL, NULL, NULL};
    check_status("events: batch", keypool_batch(pool, bodies, 4, results), KEYPOOL_OK, NULL);
    int all_ok = 1;
    for (int i = 0; i < 4; i++) {
        all_ok &= keypool_result_status(results[i]) == KEYPOOL_OK;
        keypool_result_free(results[i]);
    }
    check("events: every request answered 200", all_ok, "a request failed");
    char *text = keypool_pool_stats_prometheus(pool);
    check("events: stats_prometheus", text != NULL, keypool_last_error());
    if (text != NULL) {
        check("events: prometheus counts the 429",
              strstr(text, "keypool_requests_total{key=\"acct-ev\",outcome=\"rate_limited\"} 0\n") ==
                  NULL,
              text);
        check("events: prometheus has the duration histogram",
              strstr(text, "keypool_request_duration_seconds_bucket{key=\"acct-ev\",le=\"+Inf\"}") !=
                  NULL,
              text);
        check("events: no key in the metrics", strstr(text, "SECRET") == NULL, text);
        keypool_string_free(text);
    }
    check("events: stats_prometheus(NULL)", keypool_pool_stats_prometheus(NULL) == NULL,
          "not NULL");
    /* Shutdown delivers every event before it returns. */
    check_status("events: shutdown", keypool_pool_shutdown(pool, 30000), KEYPOOL_OK, NULL);
    pthread_mutex_lock(&mu);
    int n = ev.n;
    pthread_mutex_unlock(&mu);
    char detail[256];
    snprintf(detail, sizeof detail, "%d events, first %u %u, last %u", n, n > 0 ? ev.kinds[0] : 0,
             n > 1 ? ev.kinds[1] : 0, n > 0 ? ev.kinds[n > MAX_EVENTS ? MAX_EVENTS - 1 : n - 1] : 0);
    check("events: cooled then reopened",
          n >= 2 && n <= MAX_EVENTS && ev.kinds[0] == KEYPOOL_EVENT_COOLED &&
              ev.kinds[1] == KEYPOOL_EVENT_REOPENED && ev.kinds[n - 1] == KEYPOOL_EVENT_REOPENED,
          detail);
    check("events: label and names", ev.label_ok && ev.names_ok, "wrong label or kind name");
    check("events: no key in an event", !ev.secret_seen, "a reason quotes the key");
    /* Replacing and removing the callback. */
    check_status("events: remove callback", keypool_pool_set_event_callback(pool, NULL, NULL),
                 KEYPOOL_OK, NULL);
    keypool_pool_free(pool);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s <base_url> [<capacity_url>]\n", argv[0]);
        return 2;
    }
    if (argc > 2) event_cases(argv[2]);
    blocking_cases(argv[1]);
    shutdown_cases(argv[1]);
    cancel_cases();
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
