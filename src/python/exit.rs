//! Interpreter exit. A runtime thread that takes the GIL while the main thread finalizes the
//! interpreter crashes the process (`PyGILState_Release`, SIGSEGV). Answers and handler runs
//! already reach Python only through the event loop's own thread (see `bridge`); the one thing
//! left that enters Python from a runtime thread is a Rust log record on its way to `logging`.
//! `quiesce`, run by `atexit` before finalization starts, closes that door and waits for the
//! records already inside.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use log::{Log, Metadata, Record};
use pyo3::prelude::*;

static CLOSED: AtomicBool = AtomicBool::new(false);
/// Log calls between the check of `CLOSED` and their return.
static INSIDE: AtomicUsize = AtomicUsize::new(0);

/// Counts a call in `INSIDE` for as long as it lives.
struct Inside;

impl Inside {
    fn enter() -> Option<Inside> {
        INSIDE.fetch_add(1, Ordering::SeqCst);
        if CLOSED.load(Ordering::SeqCst) {
            INSIDE.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Inside)
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        INSIDE.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Python's `logging` behind a door that `quiesce` closes: records after it are dropped (they
/// would have nowhere to go anyway).
pub struct GatedLogger(pub pyo3_log::Logger);

impl Log for GatedLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        Inside::enter().is_some_and(|_inside| self.0.enabled(metadata))
    }

    fn log(&self, record: &Record) {
        if let Some(_inside) = Inside::enter() {
            self.0.log(record);
        }
    }

    fn flush(&self) {}
}

/// Stops every runtime thread from entering Python, and waits (without the GIL, at most a
/// second) for those already on their way in.
#[pyfunction]
pub fn quiesce(py: Python<'_>) {
    CLOSED.store(true, Ordering::SeqCst);
    py.detach(|| {
        let deadline = Instant::now() + Duration::from_secs(1);
        while INSIDE.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    });
}
