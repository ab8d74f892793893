//! Dashboard sessions: what a signed-in browser holds instead of the stack's token.
//!
//! A browser sends every cookie of `127.0.0.1` to every port of it, so nothing that opens
//! anything lives in a cookie. Signing in with the token makes a session: a random id, kept
//! server-side, that expires, ends at sign-out and with the stack, and opens only the
//! dashboard's own routes (never a gRPC port, which knows nothing of it). The page keeps it in
//! sessionStorage (scoped to scheme, host and port) and sends it as a header. An `EventSource`
//! cannot send a header, so it takes a ticket: one use, for a few seconds.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a session lasts from sign-in.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// How long a ticket waits for the stream that redeems it.
pub const TICKET_LIFETIME: Duration = Duration::from_secs(30);
/// Most sessions (and tickets) kept at once; the oldest go first. Each sign-in needs the
/// token, so only the owner makes them; the bound keeps a script's loop from growing memory.
const MOST: usize = 64;

/// Ids are kept as their BLAKE3 digest: a lookup then reveals nothing about a live id.
type Key = [u8; 32];

fn key(id: &str) -> Key {
    *blake3::hash(id.as_bytes()).as_bytes()
}

fn new_id() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[derive(Default)]
pub struct Sessions {
    inner: Mutex<Inner>,
}

/// When an entry ends, and its place in the order of issue (which breaks ties).
type Ends = (Instant, u64);

#[derive(Default)]
struct Inner {
    /// Session key → when it ends.
    sessions: HashMap<Key, Ends>,
    /// Ticket key → (when it ends, the session it was issued to).
    tickets: HashMap<Key, (Ends, Key)>,
    issued: u64,
}

impl Inner {
    fn forget_expired(&mut self, now: Instant) {
        self.sessions.retain(|_, ends| ends.0 > now);
        let sessions = &self.sessions;
        self.tickets
            .retain(|_, (ends, session)| ends.0 > now && sessions.contains_key(session));
    }

    fn ends(&mut self, at: Instant) -> Ends {
        self.issued += 1;
        (at, self.issued)
    }
}

/// Drops the entry that ends first while `map` holds `MOST` or more.
fn make_room<V>(map: &mut HashMap<Key, V>, ends: impl Fn(&V) -> Ends) {
    while map.len() >= MOST {
        let Some(first) = map.iter().min_by_key(|(_, v)| ends(v)).map(|(k, _)| *k) else {
            return;
        };
        map.remove(&first);
    }
}

impl Sessions {
    /// A new session's id.
    pub fn open(&self) -> Result<String, getrandom::Error> {
        let id = new_id()?;
        let now = Instant::now();
        let mut inner = crate::util::lock(&self.inner);
        inner.forget_expired(now);
        make_room(&mut inner.sessions, |ends| *ends);
        let ends = inner.ends(now + SESSION_LIFETIME);
        inner.sessions.insert(key(&id), ends);
        Ok(id)
    }

    pub fn valid(&self, id: &str) -> bool {
        let mut inner = crate::util::lock(&self.inner);
        inner.forget_expired(Instant::now());
        inner.sessions.contains_key(&key(id))
    }

    /// Ends a session and its tickets.
    pub fn close(&self, id: &str) {
        let mut inner = crate::util::lock(&self.inner);
        let session = key(id);
        inner.sessions.remove(&session);
        inner.tickets.retain(|_, (_, s)| *s != session);
    }

    /// Ends every session: the stack is stopping.
    pub fn close_all(&self) {
        let mut inner = crate::util::lock(&self.inner);
        inner.sessions.clear();
        inner.tickets.clear();
    }

    /// A one-use ticket for a live `session`, or `None` when the session is not live.
    pub fn ticket(&self, session: &str) -> Result<Option<String>, getrandom::Error> {
        let now = Instant::now();
        let mut inner = crate::util::lock(&self.inner);
        inner.forget_expired(now);
        let session = key(session);
        if !inner.sessions.contains_key(&session) {
            return Ok(None);
        }
        let id = new_id()?;
        make_room(&mut inner.tickets, |(ends, _)| *ends);
        let ends = inner.ends(now + TICKET_LIFETIME);
        inner.tickets.insert(key(&id), (ends, session));
        Ok(Some(id))
    }

    /// Whether `ticket` is live; it is used up either way.
    pub fn redeem(&self, ticket: &str) -> bool {
        let mut inner = crate::util::lock(&self.inner);
        inner.forget_expired(Instant::now());
        inner.tickets.remove(&key(ticket)).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_lives_until_closed() {
        let s = Sessions::default();
        let id = s.open().unwrap();
        assert_eq!(id.len(), 64);
        assert!(s.valid(&id) && !s.valid("0123") && !s.valid(""));
        s.close(&id);
        assert!(!s.valid(&id));
    }

    #[test]
    fn a_ticket_opens_one_stream_of_a_live_session() {
        let s = Sessions::default();
        let id = s.open().unwrap();
        let ticket = s.ticket(&id).unwrap().unwrap();
        assert!(!s.valid(&ticket), "a ticket is no session");
        assert!(s.redeem(&ticket));
        assert!(!s.redeem(&ticket), "a ticket is used once");
        let other = s.ticket(&id).unwrap().unwrap();
        s.close(&id);
        assert!(!s.redeem(&other), "a closed session's tickets end with it");
        assert!(s.ticket(&id).unwrap().is_none());
        assert!(s.ticket("not-a-session").unwrap().is_none());
    }

    #[test]
    fn stopping_ends_every_session() {
        let s = Sessions::default();
        let ids: Vec<String> = (0..3).map(|_| s.open().unwrap()).collect();
        s.close_all();
        assert!(ids.iter().all(|id| !s.valid(id)));
    }

    #[test]
    fn sessions_are_bounded_oldest_first() {
        let s = Sessions::default();
        let first = s.open().unwrap();
        let rest: Vec<String> = (0..MOST).map(|_| s.open().unwrap()).collect();
        assert!(!s.valid(&first));
        assert!(rest.iter().all(|id| s.valid(id)));
    }
}
