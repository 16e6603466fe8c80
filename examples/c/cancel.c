/*
 * keypool C ABI cancellation test: keypool_ticket_cancel and keypool_stream_cancel.
 *
 * One key with one worker, so a request can only be served once the one before it has
 * let go of the worker:
 * - a queued request cancelled is answered KEYPOOL_CANCELLED at once;
 * - a request on the wire (the mock delays it 30 s) cancelled from another thread,
 *   while this one waits in keypool_ticket_wait, is answered KEYPOOL_CANCELLED and its
 *   worker serves the next request long before the 30 s;
 * - a cancel after the end, or a second cancel, is a no-op (false); NULL is false;
 * - a stream cancelled mid-way ends with a KEYPOOL_CANCELLED final event; a stream
 *   freed mid-way frees its worker too.
 *
 *   cancel <base_url>   a mock server's URL (run under valgrind by run-ffi-tests.sh)
 */
#define _POSIX_C_SOURCE 200809L

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "keypool.h"

#define QUICK "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}"
#define SLOW                                                                           \
    "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], " \
    "\"mock\": {\"delay_ms\": 30000}}"
#define STALL                                                                           \
    "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], "  \
    "\"mock\": {\"stream_fault\": \"stall\", \"fault_after\": 1}}"
/* Generous: valgrind slows the library down many times. */
#define WAIT_MS 20000

static int passed, failed;

static void check(const char *name, int ok, const char *detail) {
    if (ok) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL %s: %s\n", name, detail ? detail : "");
    }
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void sleep_ms(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

/* Waits for the ticket's result and returns its status (the ticket is freed). */
static keypool_status finish(keypool_ticket *t) {
    keypool_result *r = NULL;
    keypool_status s = keypool_ticket_wait(t, WAIT_MS, &r);
    if (s == KEYPOOL_OK) {
        s = keypool_result_status(r);
        keypool_result_free(r);
    }
    keypool_ticket_free(t);
    return s;
}

/* Waits (at most 10 s) until the pool's one key has a request in flight. */
static int wait_in_flight(keypool_pool *pool) {
    for (int i = 0; i < 1000; i++) {
        char *stats = keypool_pool_stats_json(pool);
        int on_wire = stats && strstr(stats, "\"in_flight\":1") != NULL;
        keypool_string_free(stats);
        if (on_wire) {
            return 1;
        }
        sleep_ms(10);
    }
    return 0;
}

struct canceller {
    keypool_ticket *ticket;
    int cancelled;
};

static void *cancel_later(void *arg) {
    struct canceller *c = arg;
    sleep_ms(200);
    c->cancelled = keypool_ticket_cancel(c->ticket);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s <base_url>\n", argv[0]);
        return 2;
    }
    char config[1024];
    snprintf(config, sizeof config,
             "{\"base_url\": \"%s\", \"keys\": [{\"key\": \"sk-cancel\", \"label\": \"a\", "
             "\"max_concurrent\": 1}]}",
             argv[1]);
    keypool_pool *pool = NULL;
    if (keypool_pool_new(config, &pool) != KEYPOOL_OK) {
        fprintf(stderr, "keypool_pool_new: %s\n", keypool_last_error());
        return 1;
    }
    char detail[256];

    /* NULL: false, no crash. */
    check("cancel NULL ticket", !keypool_ticket_cancel(NULL), NULL);
    check("cancel NULL stream", !keypool_stream_cancel(NULL), NULL);

    /* A request on the wire, cancelled from another thread while this one waits. */
    keypool_ticket *slow = NULL;
    check("submit slow", keypool_submit(pool, SLOW, &slow) == KEYPOOL_OK, keypool_last_error());
    check("slow request in flight", wait_in_flight(pool), NULL);
    /* The worker is busy: this one waits in the queue. */
    keypool_ticket *queued = NULL;
    check("submit queued", keypool_submit(pool, QUICK, &queued) == KEYPOOL_OK,
          keypool_last_error());
    double t0 = now_s();
    check("cancel queued", keypool_ticket_cancel(queued), NULL);
    check("cancel queued again: no-op", !keypool_ticket_cancel(queued), NULL);
    keypool_status s = finish(queued);
    snprintf(detail, sizeof detail, "status %d (%s)", (int)s, keypool_status_str(s));
    check("queued answered CANCELLED", s == KEYPOOL_CANCELLED, detail);

    struct canceller c = {slow, 0};
    pthread_t th;
    pthread_create(&th, NULL, cancel_later, &c);
    keypool_result *r = NULL;
    s = keypool_ticket_wait(slow, WAIT_MS, &r); /* the other thread cancels meanwhile */
    pthread_join(th, NULL);
    check("cancel from another thread returned true", c.cancelled, NULL);
    check("wait returned a result", s == KEYPOOL_OK, keypool_last_error());
    if (s == KEYPOOL_OK) {
        s = keypool_result_status(r);
        snprintf(detail, sizeof detail, "status %d (%s), message %s", (int)s,
                 keypool_status_str(s), keypool_result_error_message(r));
        check("in-flight answered CANCELLED", s == KEYPOOL_CANCELLED, detail);
        keypool_result_free(r);
    }
    keypool_ticket_free(slow);

    /* The one worker is free again: the next request is served long before 30 s. */
    keypool_ticket *next = NULL;
    check("submit next", keypool_submit(pool, QUICK, &next) == KEYPOOL_OK, keypool_last_error());
    /* A cancel after the end is a no-op. */
    keypool_result *nr = NULL;
    s = keypool_ticket_wait(next, WAIT_MS, &nr);
    check("next served", s == KEYPOOL_OK && keypool_result_status(nr) == KEYPOOL_OK,
          keypool_last_error());
    keypool_result_free(nr);
    check("cancel after the end: no-op", !keypool_ticket_cancel(next), NULL);
    keypool_ticket_free(next);
    snprintf(detail, sizeof detail, "%.1f s", now_s() - t0);
    check("worker freed at once (well before the 30 s delay)", now_s() - t0 < 15.0, detail);

    /* A stream cancelled after its first chunk. */
    keypool_stream *st = NULL;
    check("submit stream", keypool_submit_stream(pool, STALL, &st) == KEYPOOL_OK,
          keypool_last_error());
    keypool_stream_event *ev = NULL;
    s = keypool_stream_next(st, WAIT_MS, &ev);
    check("first chunk", s == KEYPOOL_OK && keypool_stream_event_kind(ev) == KEYPOOL_STREAM_CHUNK,
          keypool_last_error());
    keypool_stream_event_free(ev);
    check("stream cancel", keypool_stream_cancel(st), NULL);
    keypool_status final_status = KEYPOOL_OK;
    for (int i = 0; i < 100; i++) {
        ev = NULL;
        if (keypool_stream_next(st, WAIT_MS, &ev) != KEYPOOL_OK) {
            break;
        }
        if (keypool_stream_event_kind(ev) == KEYPOOL_STREAM_DONE) {
            final_status = keypool_result_status(keypool_stream_event_result(ev));
            keypool_stream_event_free(ev);
            break;
        }
        keypool_stream_event_free(ev);
    }
    snprintf(detail, sizeof detail, "status %d", (int)final_status);
    check("stream ends CANCELLED", final_status == KEYPOOL_CANCELLED, detail);
    check("stream cancel again: no-op", !keypool_stream_cancel(st), NULL);
    keypool_stream_free(st);

    /* A stream freed after its first chunk frees its worker too. */
    st = NULL;
    check("submit stream 2", keypool_submit_stream(pool, STALL, &st) == KEYPOOL_OK,
          keypool_last_error());
    ev = NULL;
    s = keypool_stream_next(st, WAIT_MS, &ev);
    check("first chunk 2", s == KEYPOOL_OK, keypool_last_error());
    keypool_stream_event_free(ev);
    t0 = now_s();
    keypool_stream_free(st);
    next = NULL;
    check("submit after free", keypool_submit(pool, QUICK, &next) == KEYPOOL_OK,
          keypool_last_error());
    s = finish(next);
    check("served after a freed stream", s == KEYPOOL_OK, keypool_status_str(s));
    snprintf(detail, sizeof detail, "%.1f s", now_s() - t0);
    check("freed stream let go of its worker at once", now_s() - t0 < 15.0, detail);

    /* No key was blamed: nothing disabled, no cooldown. */
    char *stats = keypool_pool_stats_json(pool);
    check("no cooldown", stats && strstr(stats, "\"cooldown_remaining_ms\":0") != NULL, stats);
    check("not disabled", stats && strstr(stats, "\"disabled_reason\":null") != NULL, stats);
    keypool_string_free(stats);

    keypool_pool_free(pool);
    printf("cancel: %d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
