/*
 keypool_testing.h — functions libkeypool exports for tests only. Not part of the
 release header (include/keypool.h) and not installed; include it after keypool.h in a
 test program (the build of examples/c/bad_input.c adds -I capi).
 Keep in step with capi/src/ffi/panic.rs.
 */
#ifndef KEYPOOL_TESTING_H
#define KEYPOOL_TESTING_H

#include "keypool.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 For tests of a host program's panic handling: makes keypool panic on purpose, where
 a real bug would, and returns once the panic has been caught. `site` 0: inside this
 call on the calling thread (returns `KEYPOOL_PANIC`, message in
 `keypool_last_error()`). `site` 1: on one of `pool`'s worker threads, in the
 completion of a request POSTed to the pool's base URL (returns `KEYPOOL_OK` once the
 worker caught it and carries on; `KEYPOOL_TIMEOUT` if that took over 30 s). Either
 way the panic message goes to the log callback (`keypool_set_log_callback`), never
 to stderr. Other `site` values: `KEYPOOL_INVALID_ARGUMENT`.

 `pool` may be NULL for `site` 0. Not for production use; thread-safe.
 */
keypool_status keypool_test_panic(const keypool_pool *pool, uint32_t site);

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif /* KEYPOOL_TESTING_H */
