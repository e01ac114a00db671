//! The daemon as a service of systemd's (Type=notify): it says READY=1 once its kernel programs are
//! attached and the gateway has been probed (found, or found absent), keeps STATUS= saying what it
//! does, pings the watchdog from its event loop (so that a loop that hangs stops the pings and
//! systemd restarts it), and says STOPPING=1 when it begins to remove its mappings.
//!
//! Everything here is a no-op when NOTIFY_SOCKET is not set (not started by systemd).
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::{broadcast::error::RecvError, watch};
use tracing::debug;

use crate::outcome::{Outcome, OutcomeBus};

fn notify(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        debug!("telling systemd {states:?}: {e}");
    }
}

/// How often the event loop must ping the watchdog: half of WatchdogSec, if systemd set one.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec / 2))
}

pub fn watchdog_ping() {
    notify(&[NotifyState::Watchdog]);
}

pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("removing this host's mappings")]);
}

/// Follows the outcomes: READY=1 at the first Ready, and STATUS= as the gateway comes and goes.
pub async fn follow(outcomes: OutcomeBus, mut stop: watch::Receiver<bool>) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let mut feed = outcomes.subscribe();
    let mut ready = false;
    loop {
        let event = tokio::select! {
            event = feed.recv() => event,
            _ = stop.wait_for(|s| *s) => return,
        };
        let outcome = match event {
            Ok(event) => event.outcome.clone(),
            Err(RecvError::Lagged(_)) => continue,
            Err(RecvError::Closed) => return,
        };
        let status = match &outcome {
            Outcome::Ready { gateway: Some(gateway), sockets, mappings } => {
                format!("forwarding through {gateway}: {mappings} mappings for {sockets} sockets")
            }
            Outcome::Ready { gateway: None, .. } => "no gateway found yet; bound sockets wait for one".to_string(),
            Outcome::GatewayLost { why, .. } => format!("looking for the gateway again: {why}"),
            Outcome::GatewayNotFound { why } => format!("no gateway: {why}"),
            _ => continue,
        };
        let status = NotifyState::Status(&status);
        match matches!(outcome, Outcome::Ready { .. }) && !ready {
            true => {
                ready = true;
                notify(&[NotifyState::Ready, status]);
            }
            false => notify(&[status]),
        }
    }
}
