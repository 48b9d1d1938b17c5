//! Fault injection for the unit tests of update ordering: fail a step (ENOSPC, optionally after writing part of it), or "crash" there (the step and everything after it, undo included, does nothing).

use super::Step;
use std::cell::Cell;

#[derive(Clone, Copy, Debug)]
pub(super) enum Fault {
    Fail,
    FailAfter(usize),
    Crash,
    CrashAfter(usize),
}

thread_local! {
    static ARMED: Cell<Option<(Step, Fault)>> = const { Cell::new(None) };
    static CRASHED: Cell<bool> = const { Cell::new(false) };
}

pub(super) fn arm(step: Step, f: Fault) {
    ARMED.set(Some((step, f)));
    CRASHED.set(false);
}

/// Whether the armed fault has fired; disarms.
pub(super) fn fired() -> bool {
    let fired = ARMED.get().is_none();
    ARMED.set(None);
    CRASHED.set(false);
    fired
}

pub(super) fn crashed() -> bool {
    CRASHED.get()
}

pub(super) fn hit(step: Step, partial: impl FnOnce(usize) -> std::io::Result<()>) -> Option<std::io::Result<()>> {
    let enospc = || Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
    if CRASHED.get() {
        return Some(enospc());
    }
    let (s, f) = ARMED.get()?;
    if s != step {
        return None;
    }
    ARMED.set(None);
    if let Fault::FailAfter(n) | Fault::CrashAfter(n) = f {
        let _ = partial(n);
    }
    CRASHED.set(matches!(f, Fault::Crash | Fault::CrashAfter(_)));
    Some(enospc())
}
