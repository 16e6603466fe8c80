/*
 * keypool C ABI stress test: 8 threads on one pool doing keypool_submit,
 * keypool_try_submit, keypool_submit_callback, keypool_batch, keypool_ticket_wait
 * (blocking and polling) and keypool_pool_stats_json, while the main thread shuts the
 * pool down under them. Built with -fsanitize=address,undefined (the C side and the
 * interface; the Rust library itself is not instrumented).
 *
 * Every accepted request must be answered exactly once: tickets yield one result and
 * then report it taken; each callback counts its calls in its own slot; batch results
 * are counted one by one. At the end the counts must match each other and the pool's
 * own stats. Exits non-zero on any mismatch.
 *
 *   stress <base_url> [seconds]   a mock server's URL; load runs for at most `seconds`
 *                                 (default 4) before the shutdown
 */
#define _POSIX_C_SOURCE 200809L

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "keypool.h"

#define THREADS 8
#define MAX_CALLBACKS (1 << 20)
#define BATCH 4

static keypool_pool *pool;

static atomic_long tickets_accepted, tickets_answered;
static atomic_long callbacks_accepted, callbacks_called, callbacks_double;
static atomic_long batch_sent, batch_results;      /* elements accepted by the pool / results */
static atomic_long results_ok, results_cancelled, results_other;
static atomic_long refused_closed, refused_busy, refused_other;
static atomic_long stats_calls, errors;
static atomic_int slots[MAX_CALLBACKS];
static atomic_long next_slot;

static void fail(const char *what, const char *detail) {
    atomic_fetch_add(&errors, 1);
    fprintf(stderr, "stress: %s: %s\n", what, detail ? detail : "");
}

static const char *body(unsigned n) {
    static const char *const bodies[3] = {
        "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}",
        "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"bb\"}]}",
        "{\"model\": \"m\", \"max_tokens\": 4, \"messages\": [{\"role\": \"user\", \"content\": \"c\"}]}",
    };
    return bodies[n % 3];
}

static void count_result(keypool_result *r) {
    keypool_status s = keypool_result_status(r);
    if (s == KEYPOOL_OK) {
        atomic_fetch_add(&results_ok, 1);
    } else if (s == KEYPOOL_CANCELLED) {
        atomic_fetch_add(&results_cancelled, 1);
    } else {
        atomic_fetch_add(&results_other, 1);
        const char *m = keypool_result_error_message(r);
        fail("unexpected result", m ? m : keypool_status_str(s));
    }
    size_t len = 0;
    if (keypool_result_body(r, &len) == NULL) fail("result body", "NULL");
    keypool_result_free(r);
}

/* A refused submit: only CLOSED (after the shutdown) and BUSY (try_submit) are expected. */
static int refused(keypool_status s, const char *what) {
    if (s == KEYPOOL_CLOSED) {
        atomic_fetch_add(&refused_closed, 1);
        return 1; /* the pool is shut down: this thread stops */
    }
    if (s == KEYPOOL_BUSY) {
        atomic_fetch_add(&refused_busy, 1);
        return 0;
    }
    atomic_fetch_add(&refused_other, 1);
    fail(what, keypool_last_error());
    return 1;
}

/* Waits for a ticket's one result, then checks that it cannot be taken again. */
static void finish_ticket(keypool_ticket *t, int poll) {
    keypool_result *r = NULL;
    keypool_status s;
    if (poll) {
        while ((s = keypool_ticket_wait(t, 1, &r)) == KEYPOOL_TIMEOUT) {
        }
    } else {
        s = keypool_ticket_wait(t, UINT64_MAX, &r);
    }
    if (s != KEYPOOL_OK || r == NULL) {
        fail("ticket_wait", keypool_last_error());
    } else {
        atomic_fetch_add(&tickets_answered, 1);
        count_result(r);
    }
    keypool_result *again = NULL;
    if (keypool_ticket_wait(t, 0, &again) != KEYPOOL_INVALID_ARGUMENT || again != NULL)
        fail("ticket_wait twice", "a second result");
    keypool_ticket_free(t);
}

static void on_result(keypool_result *r, void *user_data) {
    long slot = (long)(intptr_t)user_data;
    if (atomic_fetch_add(&slots[slot], 1) != 0) atomic_fetch_add(&callbacks_double, 1);
    atomic_fetch_add(&callbacks_called, 1);
    count_result(r);
}

static void *worker(void *arg) {
    unsigned id = (unsigned)(uintptr_t)arg;
    /* No stop flag: every thread submits until the shutdown refuses it (KEYPOOL_CLOSED),
     * so the shutdown always runs under load, however fast the requests complete. */
    for (unsigned i = 0;; i++) {
        unsigned op = (id + i) % 6;
        keypool_ticket *t = NULL;
        keypool_status s;
        switch (op) {
        case 0: /* blocking submit, blocking wait */
        case 5: /* blocking submit, polling wait */
            s = keypool_submit(pool, body(i), &t);
            if (s != KEYPOOL_OK) {
                if (refused(s, "submit")) return NULL;
                break;
            }
            atomic_fetch_add(&tickets_accepted, 1);
            finish_ticket(t, op == 5);
            break;
        case 1: /* try_submit */
            s = keypool_try_submit(pool, body(i), &t);
            if (s != KEYPOOL_OK) {
                if (refused(s, "try_submit")) return NULL;
                break;
            }
            atomic_fetch_add(&tickets_accepted, 1);
            finish_ticket(t, 0);
            break;
        case 2: { /* callback */
            long slot = atomic_fetch_add(&next_slot, 1);
            if (slot >= MAX_CALLBACKS) return NULL;
            s = keypool_submit_callback(pool, body(i), on_result, (void *)(intptr_t)slot);
            if (s != KEYPOOL_OK) {
                if (refused(s, "submit_callback")) return NULL;
                break;
            }
            atomic_fetch_add(&callbacks_accepted, 1);
            break;
        }
        case 3: { /* batch */
            const char *bodies[BATCH];
            keypool_result *out[BATCH];
            for (int k = 0; k < BATCH; k++) {
                bodies[k] = body(i + (unsigned)k);
                out[k] = NULL;
            }
            s = keypool_batch(pool, bodies, BATCH, out);
            if (s != KEYPOOL_OK) {
                if (refused(s, "batch")) return NULL;
                break;
            }
            int closed = 0;
            for (int k = 0; k < BATCH; k++) {
                if (out[k] == NULL) {
                    fail("batch", "a NULL result");
                    continue;
                }
                atomic_fetch_add(&batch_results, 1);
                if (keypool_result_status(out[k]) == KEYPOOL_CLOSED) {
                    /* refused mid-batch by the shutdown: never reached the pool */
                    const char *code = keypool_result_error_code(out[k]);
                    if (code == NULL || strcmp(code, "closed") != 0) fail("batch code", code);
                    closed = 1;
                    keypool_result_free(out[k]);
                } else {
                    atomic_fetch_add(&batch_sent, 1);
                    count_result(out[k]);
                }
            }
            if (closed) return NULL;
            break;
        }
        case 4: { /* stats */
            char *j = keypool_pool_stats_json(pool);
            if (j == NULL) fail("stats_json", keypool_last_error());
            atomic_fetch_add(&stats_calls, 1);
            keypool_string_free(j);
            break;
        }
        }
    }
    return NULL;
}

static long json_number(const char *json, const char *field) {
    char key[64];
    snprintf(key, sizeof key, "\"%s\":", field);
    const char *p = strstr(json, key);
    return p ? strtol(p + strlen(key), NULL, 10) : -1;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s <base_url> [seconds]\n", argv[0]);
        return 2;
    }
    double seconds = argc > 2 ? atof(argv[2]) : 4.0;
    char config[1024];
    snprintf(config, sizeof config,
             "{\"base_url\": \"%s\", \"timeout_ms\": 10000, \"queue_capacity\": 16,"
             " \"strategy\": \"first_available\","
             " \"keys\": [{\"key\": \"sk-test-s1\", \"label\": \"s1\", \"max_concurrent\": 3},"
             "            {\"key\": \"sk-test-s2\", \"label\": \"s2\", \"max_concurrent\": 3}]}",
             argv[1]);
    keypool_status s = keypool_pool_new(config, &pool);
    if (s != KEYPOOL_OK) {
        fprintf(stderr, "stress: pool_new: %s\n", keypool_last_error());
        return 1;
    }
    pthread_t th[THREADS];
    for (uintptr_t i = 0; i < THREADS; i++) pthread_create(&th[i], NULL, worker, (void *)i);

    /* Let the load run, then shut down under it. */
    double start = now_s();
    struct timespec tick = {0, 20 * 1000 * 1000};
    while (now_s() - start < seconds) nanosleep(&tick, NULL);
    s = keypool_pool_shutdown(pool, UINT64_MAX);
    if (s != KEYPOOL_OK) fail("shutdown", keypool_last_error());
    for (int i = 0; i < THREADS; i++) pthread_join(th[i], NULL);

    /* Every engine thread has exited: every callback has run. */
    char *stats = keypool_pool_stats_json(pool);
    long submitted = stats ? json_number(stats, "submitted") : -1;
    long completed = stats ? json_number(stats, "completed") : -1;
    keypool_string_free(stats);
    keypool_pool_free(pool);

    long acc_t = atomic_load(&tickets_accepted), ans_t = atomic_load(&tickets_answered);
    long acc_c = atomic_load(&callbacks_accepted), call_c = atomic_load(&callbacks_called);
    long sent_b = atomic_load(&batch_sent);
    long accepted = acc_t + acc_c + sent_b;
    long answered = ans_t + call_c + sent_b;
    long slots_ok = 1;
    long used = atomic_load(&next_slot);
    if (used > MAX_CALLBACKS) used = MAX_CALLBACKS;
    long in_slots = 0;
    for (long i = 0; i < used; i++) {
        int n = atomic_load(&slots[i]);
        if (n > 1) slots_ok = 0;
        in_slots += n;
    }
    printf("stress: %.1f s; tickets %ld/%ld, callbacks %ld/%ld, batch elements %ld (results %ld);"
           " ok %ld, cancelled %ld, other %ld; refused closed %ld, busy %ld, other %ld;"
           " stats calls %ld; pool submitted %ld completed %ld\n",
           now_s() - start, ans_t, acc_t, call_c, acc_c, sent_b, atomic_load(&batch_results),
           atomic_load(&results_ok), atomic_load(&results_cancelled), atomic_load(&results_other),
           atomic_load(&refused_closed), atomic_load(&refused_busy), atomic_load(&refused_other),
           atomic_load(&stats_calls), submitted, completed);

    int bad = 0;
#define REQUIRE(cond)                                          \
    do {                                                       \
        if (!(cond)) {                                         \
            fprintf(stderr, "stress: FAILED: %s\n", #cond);    \
            bad = 1;                                           \
        }                                                      \
    } while (0)
    REQUIRE(ans_t == acc_t);
    REQUIRE(call_c == acc_c);
    REQUIRE(atomic_load(&callbacks_double) == 0);
    REQUIRE(slots_ok);
    REQUIRE(in_slots == acc_c);
    REQUIRE(answered == accepted);
    REQUIRE(atomic_load(&results_ok) + atomic_load(&results_cancelled) == answered);
    REQUIRE(submitted == accepted);
    REQUIRE(completed == submitted);
    REQUIRE(atomic_load(&results_ok) > 0);
    /* Every thread ended on a refusal: the shutdown really ran under load. */
    REQUIRE(atomic_load(&refused_closed) > 0);
    REQUIRE(atomic_load(&errors) == 0);
    if (!bad) printf("stress: every accepted request answered exactly once\n");
    return bad;
}
