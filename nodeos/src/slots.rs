//! The pure slot planner: what the node should do, decided from the state on disk alone.
//!
//! Two slots, A and B. `current` points to the active one. Each slot has one marker whose name
//! carries its health: `good`, `pending+<tries left>` or `bad` (changed by atomic rename, as
//! systemd counts boots). The slot that is not current keeps the last good version.
//!
//! No I/O here: [`crate::state`] reads the disk into a [`DiskState`], the functions below decide,
//! the executor carries the decision out.

use std::fmt;
use std::str::FromStr;

/// One of the two slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Slot::A => "A",
            Slot::B => "B",
        })
    }
}

/// A slot's health, as its marker's name says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    Good,
    Pending { tries_left: u32 },
    Bad,
}

impl Marker {
    /// The marker's file-name suffix: `good`, `pending+2`, `bad`.
    pub fn suffix(self) -> String {
        match self {
            Marker::Good => "good".into(),
            Marker::Pending { tries_left } => format!("pending+{tries_left}"),
            Marker::Bad => "bad".into(),
        }
    }
}

impl FromStr for Marker {
    type Err = ();
    fn from_str(s: &str) -> Result<Marker, ()> {
        match s {
            "good" => Ok(Marker::Good),
            "bad" => Ok(Marker::Bad),
            _ => s
                .strip_prefix("pending+")
                .and_then(|n| n.parse().ok())
                .map(|tries_left| Marker::Pending { tries_left })
                .ok_or(()),
        }
    }
}

/// What is in one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotView {
    /// The version in the slot, if the slot holds a complete one.
    pub version: Option<u32>,
    pub marker: Option<Marker>,
}

impl SlotView {
    fn usable_good(&self) -> bool {
        self.version.is_some() && self.marker == Some(Marker::Good)
    }
}

/// The state of the slots as read from disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiskState {
    pub current: Option<Slot>,
    pub a: SlotView,
    pub b: SlotView,
    /// Unix time by which a pending version must be confirmed.
    pub confirm_by: Option<u64>,
}

impl DiskState {
    pub fn slot(&self, slot: Slot) -> &SlotView {
        match slot {
            Slot::A => &self.a,
            Slot::B => &self.b,
        }
    }

    /// The version running (current slot's), if any.
    pub fn active_version(&self) -> Option<u32> {
        self.current.and_then(|s| self.slot(s).version)
    }

    /// The slot holding the last good version: the current one if good, else the other one if
    /// good.
    pub fn last_good(&self) -> Option<Slot> {
        let current = self.current?;
        if self.slot(current).usable_good() {
            Some(current)
        } else if self.slot(current.other()).usable_good() {
            Some(current.other())
        } else {
            None
        }
    }
}

/// What to do when the daemon starts (or re-reads the disk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupAction {
    /// No version is active.
    Idle,
    /// Run the current slot; `pending` tells whether it still has to prove healthy.
    Run { slot: Slot, pending: bool },
    /// The current slot is pending: this start uses one try (rename its marker).
    UseTry { slot: Slot, tries_left: u32 },
    /// Go back to the last good slot.
    RollBack {
        from: Slot,
        to: Slot,
        reason: String,
    },
    /// The current slot is bad or out of tries and no good slot exists: keep running it.
    NoFallback { slot: Slot, reason: String },
}

/// Decides what a start does, from the disk state and the time.
pub fn plan_startup(state: &DiskState, now: u64) -> StartupAction {
    let Some(slot) = state.current else {
        return StartupAction::Idle;
    };
    let view = state.slot(slot);
    let problem = match view.marker {
        _ if view.version.is_none() => {
            Some("the current slot holds no complete version".to_string())
        }
        Some(Marker::Good) => {
            return StartupAction::Run {
                slot,
                pending: false,
            }
        }
        Some(Marker::Bad) => Some("the version was marked bad".to_string()),
        None => Some("the current slot has no marker".to_string()),
        Some(Marker::Pending { tries_left: 0 }) => {
            Some("no tries left: the version did not prove healthy in time".to_string())
        }
        Some(Marker::Pending { .. }) if state.confirm_by.is_some_and(|t| now >= t) => {
            Some("the confirm timer expired".to_string())
        }
        Some(Marker::Pending { tries_left }) => {
            return StartupAction::UseTry {
                slot,
                tries_left: tries_left - 1,
            }
        }
    };
    let reason = problem.expect("every other arm returned");
    if state.slot(slot.other()).usable_good() {
        StartupAction::RollBack {
            from: slot,
            to: slot.other(),
            reason,
        }
    } else {
        StartupAction::NoFallback { slot, reason }
    }
}

/// Why an activation cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActivationRefused {
    #[error("v{version} is still pending in slot {slot}: confirm it (mark-good) or roll it back (mark-bad) first")]
    Pending { version: u32, slot: Slot },
    #[error("v{0} is already the active version")]
    AlreadyActive(u32),
}

/// The slot a new version goes into: the one that is not current (A when nothing is active).
pub fn plan_activation(state: &DiskState, version: u32) -> Result<Slot, ActivationRefused> {
    let Some(current) = state.current else {
        return Ok(Slot::A);
    };
    let view = state.slot(current);
    if let (Some(active), Some(Marker::Pending { .. })) = (view.version, view.marker) {
        return Err(ActivationRefused::Pending {
            version: active,
            slot: current,
        });
    }
    if view.version == Some(version) && view.marker == Some(Marker::Good) {
        return Err(ActivationRefused::AlreadyActive(version));
    }
    Ok(current.other())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn good(v: u32) -> SlotView {
        SlotView {
            version: Some(v),
            marker: Some(Marker::Good),
        }
    }

    fn pending(v: u32, tries_left: u32) -> SlotView {
        SlotView {
            version: Some(v),
            marker: Some(Marker::Pending { tries_left }),
        }
    }

    #[test]
    fn markers_round_trip() {
        for m in [Marker::Good, Marker::Bad, Marker::Pending { tries_left: 3 }] {
            assert_eq!(m.suffix().parse::<Marker>(), Ok(m));
        }
        assert!("pending+x".parse::<Marker>().is_err());
    }

    #[test]
    fn pending_uses_tries_then_rolls_back() {
        let mut s = DiskState {
            current: Some(Slot::B),
            a: good(1),
            b: pending(2, 2),
            confirm_by: None,
        };
        assert_eq!(
            plan_startup(&s, 0),
            StartupAction::UseTry {
                slot: Slot::B,
                tries_left: 1
            }
        );
        s.b = pending(2, 0);
        assert!(matches!(
            plan_startup(&s, 0),
            StartupAction::RollBack {
                from: Slot::B,
                to: Slot::A,
                ..
            }
        ));
    }

    #[test]
    fn confirm_timer() {
        let s = DiskState {
            current: Some(Slot::B),
            a: good(1),
            b: pending(2, 3),
            confirm_by: Some(100),
        };
        assert!(matches!(plan_startup(&s, 99), StartupAction::UseTry { .. }));
        let StartupAction::RollBack { reason, .. } = plan_startup(&s, 100) else {
            panic!()
        };
        assert!(reason.contains("confirm"));
    }

    #[test]
    fn activation_goes_to_the_other_slot_and_waits_for_pending() {
        let s = DiskState {
            current: Some(Slot::A),
            a: good(1),
            ..Default::default()
        };
        assert_eq!(plan_activation(&s, 2), Ok(Slot::B));
        assert_eq!(
            plan_activation(&s, 1),
            Err(ActivationRefused::AlreadyActive(1))
        );
        let p = DiskState {
            current: Some(Slot::B),
            a: good(1),
            b: pending(2, 3),
            confirm_by: None,
        };
        assert!(matches!(
            plan_activation(&p, 3),
            Err(ActivationRefused::Pending { .. })
        ));
        assert_eq!(plan_activation(&DiskState::default(), 1), Ok(Slot::A));
    }

    fn view() -> impl Strategy<Value = SlotView> {
        (
            proptest::option::of(1u32..5),
            proptest::option::of(prop_oneof![
                Just(Marker::Good),
                Just(Marker::Bad),
                (0u32..4).prop_map(|tries_left| Marker::Pending { tries_left }),
            ]),
        )
            .prop_map(|(version, marker)| SlotView { version, marker })
    }

    fn state() -> impl Strategy<Value = DiskState> {
        (
            proptest::option::of(prop_oneof![Just(Slot::A), Just(Slot::B)]),
            view(),
            view(),
            proptest::option::of(0u64..200),
        )
            .prop_map(|(current, a, b, confirm_by)| DiskState {
                current,
                a,
                b,
                confirm_by,
            })
    }

    proptest! {
        /// A start never rolls back to a slot that is not complete and good, never leaves a
        /// bad or exhausted version running while a good one exists, and tries only go down.
        #[test]
        fn startup_is_safe(s in state(), now in 0u64..200) {
            match plan_startup(&s, now) {
                StartupAction::RollBack { from, to, .. } => {
                    prop_assert_eq!(Some(from), s.current);
                    prop_assert_eq!(to, from.other());
                    prop_assert!(s.slot(to).usable_good());
                }
                StartupAction::UseTry { slot, tries_left } => {
                    let Some(Marker::Pending { tries_left: before }) = s.slot(slot).marker else {
                        return Err(TestCaseError::fail("UseTry on a slot that is not pending"));
                    };
                    prop_assert_eq!(tries_left + 1, before);
                    prop_assert!(s.slot(slot).version.is_some());
                }
                StartupAction::Run { slot, pending } => {
                    prop_assert!(!pending);
                    prop_assert!(s.slot(slot).usable_good());
                }
                StartupAction::NoFallback { slot, .. } => {
                    prop_assert!(!s.slot(slot.other()).usable_good());
                }
                StartupAction::Idle => prop_assert!(s.current.is_none()),
            }
        }

        /// Repeated starts of a pending version end in a rollback (or no fallback) within
        /// its tries, whatever the time.
        #[test]
        fn pending_cannot_run_forever(tries in 0u32..5, now in 0u64..10) {
            let mut s = DiskState { current: Some(Slot::B), a: good(1), b: pending(2, tries), confirm_by: None };
            for _ in 0..=tries {
                match plan_startup(&s, now) {
                    StartupAction::UseTry { tries_left, .. } => s.b.marker = Some(Marker::Pending { tries_left }),
                    StartupAction::RollBack { .. } => return Ok(()),
                    other => return Err(TestCaseError::fail(format!("{other:?}"))),
                }
            }
            let last = plan_startup(&s, now);
            prop_assert!(matches!(last, StartupAction::RollBack { .. }), "{:?}", last);
        }

        /// Activation never targets the current slot, so the running version is never
        /// overwritten.
        #[test]
        fn activation_never_overwrites_current(s in state(), v in 1u32..6) {
            if let Ok(target) = plan_activation(&s, v) {
                prop_assert_ne!(Some(target), s.current);
            }
        }
    }
}
