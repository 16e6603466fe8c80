//! Which threads belong to keypool.
//!
//! Every engine thread (the dispatcher and each worker) marks itself at start
//! ([`mark_pool_thread`]). User callbacks run on those threads, and a callback that
//! blocks waiting for the pool (a blocking `submit` on a full queue, `batch`,
//! `Ticket::wait`, waiting for shutdown) can deadlock it: once every worker sits in such
//! a callback nothing drains the queue or answers the ticket. Those calls ask
//! [`on_pool_thread`] and return [`Error::WouldDeadlock`](crate::Error::WouldDeadlock)
//! instead of blocking. The flag is per thread and process-wide: a callback of one pool
//! must not block on another pool either (two pools' callbacks waiting on each other
//! deadlock the same way).

use std::cell::Cell;

thread_local! {
    static POOL_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as a keypool engine thread (for the rest of its life).
pub(crate) fn mark_pool_thread() {
    POOL_THREAD.with(|f| f.set(true));
}

/// Whether the calling thread is a keypool engine thread (a worker or the dispatcher),
/// that is: whether the caller may be inside a completion callback.
pub(crate) fn on_pool_thread() -> bool {
    POOL_THREAD.try_with(Cell::get).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_only_the_calling_thread() {
        let marked = std::thread::spawn(|| {
            let before = on_pool_thread();
            mark_pool_thread();
            (before, on_pool_thread())
        })
        .join()
        .unwrap();
        assert_eq!(marked, (false, true));
        assert!(!on_pool_thread());
    }
}
