//! The one tokio runtime of the process: the Python bindings queue their calls on it, the command
//! line and the daemon block on it.
//!
//! A runtime's threads do not survive `fork`: in a child (Python's `multiprocessing` with the
//! `fork` start method) the parent's runtime has no worker left, and anything spawned on it would
//! wait forever. So the runtime belongs to the process that made it; a forked child gets a runtime
//! of its own on first use. The parent's is left to the child as it is (never dropped there: its
//! threads are gone, and dropping it would wait for them).

use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::Once;

use tokio::runtime::Runtime;

/// Forks since this library was loaded: counted in the child by a `pthread_atfork` handler.
static FORKS: AtomicU64 = AtomicU64::new(0);

struct Owned {
    /// `FORKS` in the process that built it.
    forks: u64,
    runtime: Runtime,
}

static CURRENT: AtomicPtr<Owned> = AtomicPtr::new(std::ptr::null_mut());

extern "C" fn count_fork() {
    FORKS.fetch_add(1, Ordering::SeqCst);
}

/// How many times this process is a forked child of the process that loaded the library; a
/// plain load, without a system call (`getpid` costs one).
pub fn forks() -> u64 {
    static AT_FORK: Once = Once::new();
    // SAFETY: the handler only bumps an atomic, which is async-signal-safe.
    AT_FORK.call_once(|| unsafe {
        libc::pthread_atfork(None, None, Some(count_fork));
    });
    FORKS.load(Ordering::SeqCst)
}

/// This process's runtime, made on first use (and again on first use in a forked child).
pub fn get() -> &'static Runtime {
    let forks = forks();
    let current = CURRENT.load(Ordering::Acquire);
    // SAFETY: every pointer stored in CURRENT comes from `Box::leak` and is never freed.
    if let Some(owned) = unsafe { current.as_ref() } {
        if owned.forks == forks {
            return &owned.runtime;
        }
    }
    let fresh: &'static mut Owned = Box::leak(Box::new(Owned {
        forks,
        runtime: tokio::runtime::Builder::new_multi_thread()
            .thread_name("dspy-agent-infra")
            .enable_all()
            .build()
            .expect("the OS lets a process start threads"),
    }));
    match CURRENT.compare_exchange(current, fresh, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => &fresh.runtime,
        Err(winner) => {
            // Another thread of this process made one first: use that one. Ours never ran a
            // task, so it can go (its own threads are still here to be joined).
            // SAFETY: `fresh` was leaked above and is referenced nowhere else.
            drop(unsafe { Box::from_raw(fresh as *mut Owned) });
            // SAFETY: as above, stored pointers are leaked boxes, never freed.
            unsafe { &(*winner).runtime }
        }
    }
}
