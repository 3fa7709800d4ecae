//! The console's sessions and one-time login codes, kept in memory by the server.
//!
//! A login code is issued to an identified principal (`portless console`), lives
//! [`Settings::code_lifetime`] and works once. Redeemed, or traded for a pasted token, it
//! opens a session: a random id the browser holds in an `HttpOnly`, `SameSite=Strict`
//! cookie, and a CSRF token the page sends with every request that changes something. A
//! session ends when it is logged out, after [`Settings::idle`] without a request, or
//! [`Settings::max`] after it opened, whichever comes first. Secrets are kept only as
//! their SHA-256, so a lookup does not compare secrets byte by byte.
//!
//! Budgets: at most [`Settings::max_sessions`] sessions and [`Settings::max_codes`] unused
//! codes are held; past either, the least recently used session (the oldest code) makes
//! room. Every method takes the time as an argument, so that expiry is tested without
//! waiting.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Default [`Settings::idle`]: 30 minutes.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(30 * 60);
/// Default [`Settings::max`]: 12 hours.
pub const DEFAULT_MAX: Duration = Duration::from_secs(12 * 3600);
/// Default [`Settings::code_lifetime`]: 2 minutes.
pub const DEFAULT_CODE_LIFETIME: Duration = Duration::from_secs(120);
/// Default [`Settings::max_sessions`].
pub const DEFAULT_MAX_SESSIONS: usize = 256;
/// Default [`Settings::max_codes`].
pub const DEFAULT_MAX_CODES: usize = 64;

/// How long sessions and codes live, and how many are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// A session without a request for this long ends.
    pub idle: Duration,
    /// A session ends this long after it opened, however busy.
    pub max: Duration,
    /// An unused login code stops working after this long.
    pub code_lifetime: Duration,
    /// Sessions held at once.
    pub max_sessions: usize,
    /// Unused login codes held at once.
    pub max_codes: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            idle: DEFAULT_IDLE,
            max: DEFAULT_MAX,
            code_lifetime: DEFAULT_CODE_LIFETIME,
            max_sessions: DEFAULT_MAX_SESSIONS,
            max_codes: DEFAULT_MAX_CODES,
        }
    }
}

/// A session just opened: what the browser is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The session id, the cookie's value.
    pub id: String,
    /// The CSRF token.
    pub csrf: String,
    /// A short public name of the session for the audit log (not a secret).
    pub tag: String,
}

/// A live session, as a request finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Active {
    /// The principal it acts for.
    pub principal: String,
    /// Its CSRF token.
    pub csrf: String,
    /// Its public name for the audit log.
    pub tag: String,
}

struct Code {
    principal: String,
    expires: Instant,
}

struct Session {
    principal: String,
    csrf: String,
    tag: String,
    opened: Instant,
    last_seen: Instant,
}

#[derive(Default)]
struct Inner {
    codes: HashMap<[u8; 32], Code>,
    sessions: HashMap<[u8; 32], Session>,
}

/// The sessions and login codes of one server.
pub struct Sessions {
    settings: Settings,
    inner: Mutex<Inner>,
}

/// Removes the entries of `map` that come first by `order` until there is room for one more
/// within `cap` (at least 1).
fn make_room<V>(map: &mut HashMap<[u8; 32], V>, cap: usize, order: impl Fn(&V) -> Instant) {
    while map.len() >= cap.max(1) {
        let Some(first) = map.iter().min_by_key(|(_, v)| order(v)).map(|(k, _)| *k) else {
            break;
        };
        map.remove(&first);
    }
}

/// The SHA-256 of a secret: how a store keeps it.
pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// 32 random bytes from the operating system, in hex: a new session id, CSRF token or code.
pub fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    // The kernel's random source does not fail once the system has booted; if it ever
    // did, a secret of zeros would be guessable, so stop rather than hand one out.
    if let Err(e) = getrandom::getrandom(&mut bytes) {
        panic!("no randomness from the operating system: {e}");
    }
    hex::encode(bytes)
}

impl Sessions {
    /// An empty store.
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> Settings {
        self.settings
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while the lock was held left no half-made entry: every change is one
        // insert or remove.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn live(&self, s: &Session, now: Instant) -> bool {
        now.saturating_duration_since(s.last_seen) < self.settings.idle
            && now.saturating_duration_since(s.opened) < self.settings.max
    }

    /// A new one-time login code for `principal`.
    pub fn issue_code(&self, principal: &str, now: Instant) -> String {
        let code = random_secret();
        let mut inner = self.lock();
        inner.codes.retain(|_, c| c.expires > now);
        make_room(&mut inner.codes, self.settings.max_codes, |c| c.expires);
        inner.codes.insert(
            digest(&code),
            Code {
                principal: principal.to_owned(),
                expires: now + self.settings.code_lifetime,
            },
        );
        code
    }

    /// The principal an unused, unexpired `code` was issued to, without using it.
    pub fn peek_code(&self, code: &str, now: Instant) -> Option<String> {
        let inner = self.lock();
        inner
            .codes
            .get(&digest(code))
            .filter(|c| c.expires > now)
            .map(|c| c.principal.clone())
    }

    /// Uses `code`: the principal it was issued to, once; `None` when it is unknown, used
    /// or expired.
    pub fn redeem_code(&self, code: &str, now: Instant) -> Option<String> {
        let mut inner = self.lock();
        let c = inner.codes.remove(&digest(code))?;
        (c.expires > now).then_some(c.principal)
    }

    /// Opens a session for `principal`.
    pub fn open(&self, principal: &str, now: Instant) -> Opened {
        let id = random_secret();
        let csrf = random_secret();
        let key = digest(&id);
        let tag = tag_of(&key);
        let mut inner = self.lock();
        inner.sessions.retain(|_, s| self.live(s, now));
        make_room(&mut inner.sessions, self.settings.max_sessions, |s| {
            s.last_seen
        });
        inner.sessions.insert(
            key,
            Session {
                principal: principal.to_owned(),
                csrf: csrf.clone(),
                tag: tag.clone(),
                opened: now,
                last_seen: now,
            },
        );
        Opened { id, csrf, tag }
    }

    /// The live session of cookie value `id`, marked as used now; `None` when there is
    /// none (never was, logged out, or expired: an expired one is dropped).
    pub fn active(&self, id: &str, now: Instant) -> Option<Active> {
        let key = digest(id);
        let mut inner = self.lock();
        let live = inner.sessions.get(&key).map(|s| self.live(s, now))?;
        if !live {
            inner.sessions.remove(&key);
            return None;
        }
        let s = inner.sessions.get_mut(&key)?;
        s.last_seen = now;
        Some(Active {
            principal: s.principal.clone(),
            csrf: s.csrf.clone(),
            tag: s.tag.clone(),
        })
    }

    /// Ends the session of cookie value `id`; what it was, if it was live.
    pub fn close(&self, id: &str, now: Instant) -> Option<Active> {
        let s = self.lock().sessions.remove(&digest(id))?;
        self.live(&s, now).then_some(Active {
            principal: s.principal,
            csrf: s.csrf,
            tag: s.tag,
        })
    }

    /// Sessions held now (live or not yet dropped).
    pub fn len(&self) -> usize {
        self.lock().sessions.len()
    }

    /// Whether no session is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The public name of the session whose id has SHA-256 `key`, for the audit log.
pub fn tag_of(key: &[u8; 32]) -> String {
    hex::encode(&key[..4])
}

/// Compares two secrets in time that depends on their lengths only.
pub fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Sessions {
        Sessions::new(Settings {
            idle: Duration::from_secs(60),
            max: Duration::from_secs(600),
            code_lifetime: Duration::from_secs(10),
            max_sessions: 3,
            max_codes: 2,
        })
    }

    #[test]
    fn a_code_works_once_and_not_after_it_expires() {
        let s = store();
        let t0 = Instant::now();
        let code = s.issue_code("ops", t0);
        assert_eq!(code.len(), 64);
        assert_eq!(s.peek_code(&code, t0).as_deref(), Some("ops"));
        assert_eq!(s.redeem_code(&code, t0).as_deref(), Some("ops"));
        assert_eq!(s.redeem_code(&code, t0), None, "used twice");
        assert_eq!(s.peek_code(&code, t0), None);
        let late = s.issue_code("ops", t0);
        assert_eq!(s.redeem_code(&late, t0 + Duration::from_secs(10)), None);
        assert_eq!(s.redeem_code("not-a-code", t0), None);
    }

    #[test]
    fn codes_past_the_budget_push_out_the_oldest() {
        let s = store();
        let t0 = Instant::now();
        let first = s.issue_code("a", t0);
        let second = s.issue_code("b", t0 + Duration::from_secs(1));
        let third = s.issue_code("c", t0 + Duration::from_secs(2));
        assert_eq!(s.redeem_code(&first, t0), None);
        assert!(s.redeem_code(&second, t0).is_some());
        assert!(s.redeem_code(&third, t0).is_some());
    }

    #[test]
    fn sessions_expire_when_idle_and_at_their_maximum() {
        let s = store();
        let t0 = Instant::now();
        let o = s.open("ops", t0);
        assert_ne!(o.id, o.csrf);
        let a = s.active(&o.id, t0 + Duration::from_secs(59)).expect("live");
        assert_eq!(
            (a.principal.as_str(), a.csrf.as_str()),
            ("ops", o.csrf.as_str())
        );
        // Used at 59 s, it is live until 119 s.
        assert!(s.active(&o.id, t0 + Duration::from_secs(118)).is_some());
        assert!(s.active(&o.id, t0 + Duration::from_secs(178)).is_none());
        assert!(
            s.active(&o.id, t0).is_none(),
            "an expired session is dropped"
        );

        let busy = s.open("ops", t0);
        let mut t = t0;
        while t < t0 + Duration::from_secs(599) {
            t += Duration::from_secs(50);
            if t < t0 + Duration::from_secs(600) {
                assert!(s.active(&busy.id, t).is_some());
            }
        }
        assert!(s.active(&busy.id, t0 + Duration::from_secs(600)).is_none());
    }

    #[test]
    fn logout_ends_a_session_and_the_budget_evicts_the_idlest() {
        let s = store();
        let t0 = Instant::now();
        let a = s.open("a", t0);
        let b = s.open("b", t0 + Duration::from_secs(1));
        let c = s.open("c", t0 + Duration::from_secs(2));
        assert!(s.active(&a.id, t0 + Duration::from_secs(3)).is_some());
        let d = s.open("d", t0 + Duration::from_secs(4));
        assert_eq!(s.len(), 3);
        assert!(
            s.active(&b.id, t0 + Duration::from_secs(5)).is_none(),
            "idlest went"
        );
        for o in [&a, &c, &d] {
            assert!(s.active(&o.id, t0 + Duration::from_secs(5)).is_some());
        }
        assert_eq!(
            s.close(&c.id, t0 + Duration::from_secs(6))
                .map(|x| x.principal),
            Some("c".into())
        );
        assert!(s.active(&c.id, t0 + Duration::from_secs(6)).is_none());
        assert!(s.close(&c.id, t0 + Duration::from_secs(6)).is_none());
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
        assert!(!same_secret("", "a"));
    }
}
