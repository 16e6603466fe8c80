//! (h) The channel behaviour the dispatcher relies on, checked directly: a send on a
//! zero-capacity channel succeeds only when a receiver is waiting, and `Select` over
//! several such senders blocks until one has a waiting receiver, then completes the
//! send on exactly that one.

use std::sync::Barrier;
use std::time::Duration;

use crossbeam_channel::{Select, TrySendError, bounded};

#[test]
fn try_send_on_bounded_zero_needs_a_waiting_receiver() {
    let (tx, rx) = bounded::<u32>(0);
    assert!(matches!(tx.try_send(1), Err(TrySendError::Full(1))));
    std::thread::scope(|s| {
        let h = s.spawn(|| rx.recv().unwrap());
        // Blocking send completes exactly when the receiver arrives.
        tx.send(2).unwrap();
        assert_eq!(h.join().unwrap(), 2);
    });
    // The receiver is not waiting any more: full again.
    assert!(matches!(tx.try_send(3), Err(TrySendError::Full(3))));
}

#[test]
fn select_blocks_until_a_receiver_waits_and_picks_that_sender() {
    let (tx_a, rx_a) = bounded::<&str>(0);
    let (tx_b, rx_b) = bounded::<&str>(0);
    // Nobody receiving: a select with a deadline times out rather than sending.
    {
        let mut sel = Select::new();
        sel.send(&tx_a);
        sel.send(&tx_b);
        assert!(sel.select_timeout(Duration::from_millis(30)).is_err());
    }
    let start = Barrier::new(2);
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            start.wait();
            rx_b.recv().unwrap()
        });
        start.wait();
        // Only B ever gets a receiver: the select must pick B, however long it takes.
        let mut sel = Select::new();
        let ia = sel.send(&tx_a);
        let ib = sel.send(&tx_b);
        let op = sel.select();
        assert_eq!(op.index(), ib);
        assert_ne!(op.index(), ia);
        op.send(&tx_b, "job").unwrap();
        assert_eq!(h.join().unwrap(), "job");
    });
    // A never had a receiver: still full.
    assert!(tx_a.try_send("x").is_err());
    drop(rx_a);
}

#[test]
fn select_mixes_sends_and_receives_and_sees_disconnect() {
    let (tx, _rx_kept) = bounded::<u8>(0);
    let (shutdown_tx, shutdown_rx) = bounded::<()>(0);
    std::thread::scope(|s| {
        s.spawn(move || drop(shutdown_tx));
        let mut sel = Select::new();
        let i_send = sel.send(&tx);
        let i_shutdown = sel.recv(&shutdown_rx);
        let op = sel.select();
        // No receiver ever waits on `tx`, so only the disconnect can wake us.
        assert_eq!(op.index(), i_shutdown);
        assert_ne!(op.index(), i_send);
        assert!(op.recv(&shutdown_rx).is_err());
    });
}

#[test]
fn many_waiting_receivers_each_take_one_message() {
    // A key's workers share one receiver: with W workers waiting, exactly W sends
    // succeed without blocking, the next does not.
    let (tx, rx) = bounded::<usize>(0);
    let (done_tx, done_rx) = bounded::<usize>(8);
    let ready = Barrier::new(5);
    std::thread::scope(|s| {
        for _ in 0..4 {
            let (rx, done_tx, ready) = (rx.clone(), done_tx.clone(), &ready);
            s.spawn(move || {
                ready.wait();
                let v = rx.recv().unwrap();
                done_tx.send(v).unwrap();
            });
        }
        ready.wait();
        for i in 0..4 {
            tx.send(i).unwrap();
        }
        let mut got: Vec<usize> = (0..4).map(|_| done_rx.recv().unwrap()).collect();
        got.sort();
        assert_eq!(got, vec![0, 1, 2, 3]);
        assert!(tx.try_send(9).is_err(), "no worker is waiting any more");
    });
}
