/*
 * keypool C ABI benchmark: the "keypool_batch (C ABI)" line of benches/cpu.rs.
 *
 *   bench_batch <base_url> <requests>      e.g. bench_batch http://127.0.0.1:8080/v1 40000
 *
 * The same scenario as benches/cpu.rs's `Pool::batch` line: 16 keys x 16 workers
 * (keys "sk-bench-0".."sk-bench-15"), first_available, queue_capacity 4096, one attempt
 * per request, default timeouts. Warm-up as the Rust line does (a throwaway pool sends
 * 2 x 256 requests; the measured pool first sends 256 so its connections are open), then
 * the measured section: the `<requests>` bodies built with snprintf (inside the measured
 * section, as the Rust line builds each `Request::chat` inside `Pool::batch`), sent in
 * one `keypool_batch` call, every result checked and freed (also measured, as the Rust
 * line drops its results inside the measured statement).
 *
 * Prints one line (totals, not per request; benches/cpu.rs parses it):
 *
 *   bench_batch requests=N wall_s=S user_us=U sys_us=Y csw=C faults=F failures=X
 *
 * where user_us/sys_us are ru_utime/ru_stime deltas in microseconds, csw the
 * ru_nvcsw + ru_nivcsw delta and faults the ru_minflt + ru_majflt delta
 * (getrusage(RUSAGE_SELF): every thread of this process). Exits 0 when every call
 * returned KEYPOOL_OK and every request succeeded; 1 otherwise (the line is still
 * printed if the measured batch ran).
 */
#define _POSIX_C_SOURCE 200809L

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <time.h>

#include "keypool.h"

#define KEYS 16
#define PER_KEY 16
#define BODY_MAX 128

static int fail(const char *what, keypool_status s) {
    fprintf(stderr, "bench_batch: %s failed: %s (%d): %s\n", what, keypool_status_str(s), (int)s,
            keypool_last_error());
    return 1;
}

/* The pool of benches/cpu.rs's config(): 16 keys x 16 workers, one attempt. */
static keypool_status new_pool(const char *base_url, keypool_pool **out) {
    char config[4096];
    size_t len = (size_t)snprintf(config, sizeof config,
                                  "{\"base_url\": \"%s\", \"strategy\": \"first_available\", "
                                  "\"queue_capacity\": 4096, \"retry\": {\"max_attempts\": 1}, "
                                  "\"keys\": [",
                                  base_url);
    for (int k = 0; k < KEYS && len < sizeof config; k++) {
        len += (size_t)snprintf(config + len, sizeof config - len,
                                "%s{\"key\": \"sk-bench-%d\", \"max_concurrent\": %d}",
                                k ? ", " : "", k, PER_KEY);
    }
    if (len < sizeof config) len += (size_t)snprintf(config + len, sizeof config - len, "]}");
    if (len >= sizeof config) {
        fprintf(stderr, "bench_batch: base_url too long\n");
        return KEYPOOL_INVALID_ARGUMENT;
    }
    return keypool_pool_new(config, out);
}

/* The body `Request::chat("bench", [("user", "benchmark prompt number {i}")])` sends. */
static void build_body(char *buf, size_t i) {
    snprintf(buf, BODY_MAX,
             "{\"model\":\"bench\",\"messages\":[{\"role\":\"user\",\"content\":"
             "\"benchmark prompt number %zu\"}]}",
             i);
}

/*
 * Sends n bodies in one keypool_batch call and frees every result. Returns the number
 * of failed requests, or -1 if a call failed. `storage`, `bodies` and `results` have
 * room for n elements.
 */
static long run_batch(keypool_pool *pool, size_t n, char *storage, const char **bodies,
                      keypool_result **results) {
    for (size_t i = 0; i < n; i++) {
        build_body(storage + i * BODY_MAX, i);
        bodies[i] = storage + i * BODY_MAX;
    }
    keypool_status s = keypool_batch(pool, bodies, n, results);
    if (s != KEYPOOL_OK) {
        fail("keypool_batch", s);
        return -1;
    }
    long failures = 0;
    for (size_t i = 0; i < n; i++) {
        keypool_status rs = keypool_result_status(results[i]);
        if (rs != KEYPOOL_OK) {
            if (failures == 0) {
                fprintf(stderr, "bench_batch: request %zu: %s (%d): %s\n", i,
                        keypool_status_str(rs), (int)rs, keypool_result_error_message(results[i]));
            }
            failures++;
        }
        keypool_result_free(results[i]);
    }
    return failures;
}

static double tv_us(struct timeval t) { return (double)t.tv_sec * 1e6 + (double)t.tv_usec; }

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: bench_batch <base_url> <requests>\n");
        return 2;
    }
    const char *base_url = argv[1];
    char *end = NULL;
    unsigned long long parsed = strtoull(argv[2], &end, 10);
    if (end == argv[2] || *end != '\0' || parsed == 0 || parsed > 100000000ULL) {
        fprintf(stderr, "bench_batch: <requests> must be a number from 1 to 100000000\n");
        return 2;
    }
    size_t n = (size_t)parsed;
    size_t warm = 2 * KEYS * PER_KEY;
    size_t cap = n > warm ? n : warm;
    char *storage = malloc(cap * BODY_MAX);
    const char **bodies = malloc(cap * sizeof *bodies);
    keypool_result **results = malloc(cap * sizeof *results);
    if (storage == NULL || bodies == NULL || results == NULL) {
        fprintf(stderr, "bench_batch: out of memory\n");
        return 1;
    }
    int rc = 0;
    keypool_status s;

    /* Warm-up (connections, allocator), not measured: a throwaway pool. */
    keypool_pool *pool = NULL;
    if ((s = new_pool(base_url, &pool)) != KEYPOOL_OK) return fail("keypool_pool_new", s);
    long wf = run_batch(pool, warm, storage, bodies, results);
    keypool_pool_free(pool);
    if (wf != 0) {
        fprintf(stderr, "bench_batch: warm-up: %ld failures\n", wf);
        return 1;
    }

    /* The measured pool, its connections opened first. */
    pool = NULL;
    if ((s = new_pool(base_url, &pool)) != KEYPOOL_OK) return fail("keypool_pool_new", s);
    wf = run_batch(pool, KEYS * PER_KEY, storage, bodies, results);
    if (wf != 0) {
        fprintf(stderr, "bench_batch: connection warm-up: %ld failures\n", wf);
        keypool_pool_free(pool);
        return 1;
    }

    struct rusage r0, r1;
    struct timespec t0, t1;
    if (getrusage(RUSAGE_SELF, &r0) != 0 || clock_gettime(CLOCK_MONOTONIC, &t0) != 0) {
        perror("bench_batch: getrusage/clock_gettime");
        keypool_pool_free(pool);
        return 1;
    }
    long failures = run_batch(pool, n, storage, bodies, results);
    if (clock_gettime(CLOCK_MONOTONIC, &t1) != 0 || getrusage(RUSAGE_SELF, &r1) != 0) {
        perror("bench_batch: getrusage/clock_gettime");
        keypool_pool_free(pool);
        return 1;
    }
    keypool_pool_free(pool);
    free(storage);
    free(bodies);
    free(results);
    if (failures < 0) return 1;

    double wall = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("bench_batch requests=%zu wall_s=%.6f user_us=%.0f sys_us=%.0f csw=%ld faults=%ld "
           "failures=%ld\n",
           n, wall, tv_us(r1.ru_utime) - tv_us(r0.ru_utime), tv_us(r1.ru_stime) - tv_us(r0.ru_stime),
           (r1.ru_nvcsw + r1.ru_nivcsw) - (r0.ru_nvcsw + r0.ru_nivcsw),
           (r1.ru_minflt + r1.ru_majflt) - (r0.ru_minflt + r0.ru_majflt), failures);
    if (failures > 0) rc = 1;
    return rc;
}
