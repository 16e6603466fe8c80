//! Ctrl-C (SIGINT) and SIGTERM, delivered as messages on a channel.

use crossbeam_channel::Receiver;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Stops the default "terminate at once" action for SIGINT and SIGTERM and returns a
/// channel that receives one message per signal.
pub fn interrupts() -> Result<Receiver<()>, String> {
    let mut signals = Signals::new([SIGINT, SIGTERM])
        .map_err(|e| format!("cannot install the Ctrl-C handler: {e}"))?;
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::Builder::new()
        .name("keypool-signals".into())
        .spawn(move || {
            for _ in signals.forever() {
                if tx.send(()).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    Ok(rx)
}
