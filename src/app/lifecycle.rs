//! The daemon's role and readiness as `/readyz` and systemd see them (`starting`, `standby`,
//! `leader`, `draining`); every transition is told to systemd once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::http::{Health, Role};
use crate::notify;

/// Role and readiness as seen by `/readyz` and systemd; every transition is logged once.
pub(super) struct Lifecycle {
    pub(super) health: Arc<Health>,
    ready_sent: AtomicBool,
    stopping_sent: AtomicBool,
}

impl Lifecycle {
    pub(super) fn new(health: Arc<Health>) -> Self {
        Self {
            health,
            ready_sent: AtomicBool::new(false),
            stopping_sent: AtomicBool::new(false),
        }
    }

    /// Start-up is finished once the first lease decision is made: tell systemd (once).
    pub(super) fn ready(&self) {
        if !self.ready_sent.swap(true, Ordering::AcqRel) {
            notify::ready();
        }
    }

    pub(super) fn standby(&self) {
        if self.stopping_sent.load(Ordering::Acquire) {
            return;
        }
        self.health.set_role(Role::Standby);
        self.ready();
        notify::status("standby: waiting for the leader lease");
    }

    pub(super) fn leader(&self, fence: i64, cursor: Option<i64>) {
        self.health.set_role(Role::Leader);
        if let Some(c) = cursor {
            self.health.set_cursor(c);
        }
        self.ready();
        notify::status(&format!("leader (fence {fence})"));
    }

    /// The stop request was seen: `/readyz` goes 503 and systemd hears `STOPPING=1` (once).
    pub(super) fn draining(&self) {
        self.health.set_role(Role::Draining);
        if !self.stopping_sent.swap(true, Ordering::AcqRel) {
            notify::stopping();
        }
    }
}
