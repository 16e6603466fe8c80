/*
 * keypool C example: a batch of 100 prompts over 4 keys, a few tickets, one callback.
 *
 *   batch <base_url>        e.g. batch http://127.0.0.1:8080/v1
 *
 * Exits 0 when every request succeeded and the header and library versions agree.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "keypool.h"

#define N_BATCH 100
#define N_KEYS 4
#define N_TICKETS 5

static const char *const LABELS[N_KEYS] = {"acct-a", "acct-b", "acct-c", "acct-d"};

#define STR_(x) #x
#define STR(x) STR_(x)

static int fail(const char *what, keypool_status s) {
    fprintf(stderr, "batch: %s failed: %s (%d): %s\n", what, keypool_status_str(s), (int)s,
            keypool_last_error());
    return 1;
}

static int check_version(void) {
    char expect[64];
    snprintf(expect, sizeof expect, "%d.%d.%d", KEYPOOL_VERSION_MAJOR, KEYPOOL_VERSION_MINOR,
             KEYPOOL_VERSION_PATCH);
    const char *lib = keypool_version();
    int major = -1, minor = -1, patch = -1;
    if (lib == NULL || sscanf(lib, "%d.%d.%d", &major, &minor, &patch) != 3) {
        fprintf(stderr, "batch: keypool_version() is not MAJOR.MINOR.PATCH\n");
        return 1;
    }
    if (strcmp(lib, KEYPOOL_VERSION) != 0 || strcmp(lib, expect) != 0 ||
        major * 10000 + minor * 100 + patch != KEYPOOL_VERSION_NUMBER ||
        keypool_version_number() != KEYPOOL_VERSION_NUMBER) {
        fprintf(stderr,
                "batch: version mismatch: library %s, header " KEYPOOL_VERSION
                " (number " STR(KEYPOOL_VERSION_NUMBER) ")\n",
                lib);
        return 1;
    }
    printf("keypool %s (header " KEYPOOL_VERSION ", number %d)\n", lib, KEYPOOL_VERSION_NUMBER);
    return 0;
}

/* The callback's state: set under the mutex, signalled through the condition. */
struct callback_state {
    pthread_mutex_t mu;
    pthread_cond_t cond;
    int done;
    keypool_status status;
    uint16_t http_status;
    char label[64];
};

static void on_result(keypool_result *r, void *user_data) {
    struct callback_state *st = user_data;
    pthread_mutex_lock(&st->mu);
    st->status = keypool_result_status(r);
    st->http_status = keypool_result_http_status(r);
    snprintf(st->label, sizeof st->label, "%s", keypool_result_key_label(r));
    st->done = 1;
    pthread_cond_signal(&st->cond);
    pthread_mutex_unlock(&st->mu);
    keypool_result_free(r);
}

/* Waits up to timeout_s seconds for the callback (no sleep loop). */
static int wait_callback(struct callback_state *st, int timeout_s) {
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += timeout_s;
    int rc = 0;
    pthread_mutex_lock(&st->mu);
    while (!st->done && rc != ETIMEDOUT) {
        rc = pthread_cond_timedwait(&st->cond, &st->mu, &deadline);
    }
    int done = st->done;
    pthread_mutex_unlock(&st->mu);
    return done;
}

static int label_index(const char *label) {
    for (int k = 0; k < N_KEYS; k++) {
        if (strcmp(label, LABELS[k]) == 0) return k;
    }
    return -1;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s <base_url>\n", argv[0]);
        return 2;
    }
    if (check_version() != 0) return 1;

    char config[1024];
    snprintf(config, sizeof config,
             "{\"base_url\": \"%s\", \"strategy\": \"round_robin\", \"timeout_ms\": 30000,"
             " \"keys\": ["
             "{\"key\": \"sk-test-a\", \"label\": \"acct-a\", \"max_concurrent\": 4},"
             "{\"key\": \"sk-test-b\", \"label\": \"acct-b\", \"max_concurrent\": 4},"
             "{\"key\": \"sk-test-c\", \"label\": \"acct-c\", \"max_concurrent\": 4},"
             "{\"key\": \"sk-test-d\", \"label\": \"acct-d\", \"max_concurrent\": 4}]}",
             argv[1]);

    keypool_pool *pool = NULL;
    keypool_status s = keypool_pool_new(config, &pool);
    if (s != KEYPOOL_OK) return fail("keypool_pool_new", s);

    int failures = 0;

    /* 1. A batch of 100, results in input order. */
    char *bodies[N_BATCH];
    for (int i = 0; i < N_BATCH; i++) {
        bodies[i] = malloc(160);
        snprintf(bodies[i], 160,
                 "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"prompt %d\"}]}",
                 i);
    }
    keypool_result *results[N_BATCH];
    s = keypool_batch(pool, (const char *const *)bodies, N_BATCH, results);
    for (int i = 0; i < N_BATCH; i++) free(bodies[i]);
    if (s != KEYPOOL_OK) {
        keypool_pool_free(pool);
        return fail("keypool_batch", s);
    }
    int per_key[N_KEYS] = {0};
    int ok = 0;
    for (int i = 0; i < N_BATCH; i++) {
        keypool_result *r = results[i];
        size_t len = 0;
        const uint8_t *body = keypool_result_body(r, &len);
        if (keypool_result_status(r) == KEYPOOL_OK && keypool_result_http_status(r) == 200 &&
            body != NULL && len > 0 && keypool_result_error_message(r) == NULL) {
            ok++;
        } else {
            const char *msg = keypool_result_error_message(r);
            fprintf(stderr, "batch: result %d: %s\n", i, msg ? msg : "(no message)");
        }
        int k = label_index(keypool_result_key_label(r));
        if (k >= 0) per_key[k]++;
        keypool_result_free(r);
    }
    printf("batch: %d/%d OK\n", ok, N_BATCH);
    for (int k = 0; k < N_KEYS; k++) printf("  %s: %d\n", LABELS[k], per_key[k]);
    if (ok != N_BATCH) failures++;

    /* 2. A few tickets. */
    keypool_ticket *tickets[N_TICKETS];
    int n_tickets = 0;
    for (int i = 0; i < N_TICKETS; i++) {
        s = keypool_submit(pool, "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"ticket\"}]}",
                           &tickets[n_tickets]);
        if (s != KEYPOOL_OK) {
            fail("keypool_submit", s);
            failures++;
            continue;
        }
        n_tickets++;
    }
    for (int i = 0; i < n_tickets; i++) {
        keypool_result *r = NULL;
        s = keypool_ticket_wait(tickets[i], 30000, &r);
        if (s != KEYPOOL_OK) {
            fail("keypool_ticket_wait", s);
            failures++;
        } else {
            if (keypool_result_status(r) != KEYPOOL_OK) failures++;
            printf("ticket %d: HTTP %u via %s, %u attempt(s), %llu ms\n", i,
                   (unsigned)keypool_result_http_status(r), keypool_result_key_label(r),
                   (unsigned)keypool_result_attempts(r),
                   (unsigned long long)keypool_result_latency_ms(r));
            keypool_result_free(r);
        }
        keypool_ticket_free(tickets[i]);
    }

    /* 3. One callback, waited for with a condition variable and a timeout. */
    struct callback_state st;
    memset(&st, 0, sizeof st);
    pthread_mutex_init(&st.mu, NULL);
    pthread_cond_init(&st.cond, NULL);
    s = keypool_submit_callback(
        pool, "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"callback\"}]}",
        on_result, &st);
    if (s != KEYPOOL_OK) {
        fail("keypool_submit_callback", s);
        failures++;
    } else if (!wait_callback(&st, 30)) {
        fprintf(stderr, "batch: the callback did not run within 30 s\n");
        failures++;
    } else {
        printf("callback: %s, HTTP %u via %s\n", keypool_status_str(st.status),
               (unsigned)st.http_status, st.label);
        if (st.status != KEYPOOL_OK) failures++;
    }

    /* 4. Stats. */
    char *stats = keypool_pool_stats_json(pool);
    if (stats == NULL) {
        fprintf(stderr, "batch: stats failed: %s\n", keypool_last_error());
        failures++;
    } else {
        printf("stats: %s\n", stats);
        if (strstr(stats, "sk-test-") != NULL) {
            fprintf(stderr, "batch: an API key leaked into the stats\n");
            failures++;
        }
        keypool_string_free(stats);
    }

    s = keypool_pool_shutdown(pool, 10000);
    if (s != KEYPOOL_OK) {
        fail("keypool_pool_shutdown", s);
        failures++;
    }
    keypool_pool_free(pool);
    /* The callback state may be destroyed only once no callback can run: after free. */
    pthread_cond_destroy(&st.cond);
    pthread_mutex_destroy(&st.mu);

    if (failures != 0) {
        fprintf(stderr, "batch: %d failure(s)\n", failures);
        return 1;
    }
    printf("batch: all OK\n");
    return 0;
}
