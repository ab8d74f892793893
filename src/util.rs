//! Small helpers every layer uses; this module imports nothing of the crate.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `m`. A panic elsewhere while it was held leaves plain data behind, still usable, so a
/// poisoned lock is taken as it is.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `lock` for reading a `RwLock`.
pub fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

/// `lock` for writing a `RwLock`.
pub fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

/// The Docker network every container of `project` joins.
pub fn network_name(project: &str) -> String {
    format!("{project}_default")
}

/// A long-running process must not die when a peer closes a socket it still writes to (a client
/// that went away mid-response): the write fails with EPIPE instead. The command line, which
/// launches the daemon and the watchdog, lets SIGPIPE end it like any Unix tool.
pub fn ignore_sigpipe() {
    // SAFETY: setting a signal's disposition to SIG_IGN has no memory effects.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// Milliseconds since the epoch of an RFC 3339 time as the Engine writes it
/// (`2026-11-27T09:40:12.123456789Z`); `None` for the Engine's "never" (year 1).
pub fn rfc3339_ms(text: &str) -> Option<i64> {
    let (date, time) = text.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    if y < 1970 {
        return None;
    }
    let (clock, offset_s) = match time.find(['Z', '+', '-']) {
        Some(i) if &time[i..i + 1] == "Z" => (&time[..i], 0),
        Some(i) => {
            let sign = if &time[i..i + 1] == "-" { -1 } else { 1 };
            let (oh, om) = time[i + 1..].split_once(':')?;
            (
                &time[..i],
                sign * (oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().ok()? * 60),
            )
        }
        None => (time, 0),
    };
    let (hms, frac) = clock.split_once('.').unwrap_or((clock, ""));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (h, min, s) = (t.next()??, t.next()??, t.next()??);
    let millis: i64 = format!("{frac:0<3}")[..3].parse().ok()?;
    // Days from the civil date (proleptic Gregorian), after Howard Hinnant's algorithm.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + h * 3600 + min * 60 + s) - offset_s) * 1000 + millis)
}

/// Whether process `pid` of this machine has ended (a zombie has).
pub fn is_dead(pid: u32) -> bool {
    let Ok(raw) = libc::pid_t::try_from(pid) else {
        return true;
    };
    // SAFETY: signal 0 only checks that the process exists.
    let exists = unsafe { libc::kill(raw, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    if !exists {
        return true;
    }
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|s| s == "Z"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_times_convert_to_epoch_milliseconds() {
        assert_eq!(rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            rfc3339_ms("2026-11-27T09:40:12.123456789Z"),
            Some(1_795_772_412_123)
        );
        assert_eq!(
            rfc3339_ms("2026-11-27T10:40:12.5+01:00"),
            Some(1_795_772_412_500)
        );
        assert_eq!(rfc3339_ms("0001-01-01T00:00:00Z"), None);
        assert_eq!(rfc3339_ms("yesterday"), None);
    }
}

/// The tasks a stack started and the token that stops them: every background task of a stack is
/// spawned here, with a child of the root token, so stopping can cancel all of them and then wait
/// until each has ended.
#[derive(Clone, Default)]
pub struct Background {
    tracker: tokio_util::task::TaskTracker,
    root: tokio_util::sync::CancellationToken,
}

impl Background {
    /// A token cancelled when the stack stops (or earlier, by its holder).
    pub fn token(&self) -> tokio_util::sync::CancellationToken {
        self.root.child_token()
    }

    /// Runs `task` as one of the stack's tasks; it should end once `token()` is cancelled.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// Runs `task` until it ends or the stack stops, whichever comes first.
    pub fn spawn_until_stopped<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let stop = self.token();
        self.tracker.spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = task => {}
            }
        });
    }

    /// How many of its tasks are still running.
    pub fn running(&self) -> usize {
        self.tracker.len()
    }

    /// Cancels every task's token; `stop` also waits for them.
    pub fn cancel(&self) {
        self.root.cancel();
    }

    /// Cancels every task's token, then waits until all of them have ended.
    pub async fn stop(&self) {
        self.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}
