//! Dashboard sessions: operator logins held in memory, each with its CSRF
//! token, and one-time login codes (`edgefleet demo` prints a link).
//!
//! Design:
//! - the session id and the CSRF token are 256 random bits each (OS RNG),
//!   hex-encoded; they are distinct types ([`SessionId`], [`CsrfToken`]) so
//!   one cannot be checked where the other is meant;
//! - the cookie is `HttpOnly; SameSite=Strict; Path=/` (a cross-site request
//!   carries no cookie at all), and every state-changing form also carries the
//!   session's CSRF token (OWASP CSRF Prevention Cheat Sheet, "Synchronizer
//!   token pattern"), compared in constant time;
//! - sessions live [`SESSION_TTL`] from login and die with the process (the
//!   operator logs in again after a restart); a one-time code lives
//!   [`ONE_TIME_TTL`] and works once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::RngCore as _;

/// Name of the session cookie.
pub const COOKIE: &str = "edgefleet_session";

/// Lifetime of a session from login.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// Lifetime of a one-time login code.
pub const ONE_TIME_TTL: Duration = Duration::from_secs(15 * 60);

/// Sessions kept at most; the oldest is dropped beyond it (bounded memory
/// against a client that logs in in a loop).
pub const MAX_SESSIONS: usize = 10_000;

/// A session id (the cookie's value): 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionId(String);

/// A session's CSRF token (the `csrf` field of every form): 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrfToken(String);

impl CsrfToken {
    /// The token as the form field carries it.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether a submitted value is this token (constant time).
    pub fn matches(&self, submitted: &str) -> bool {
        crate::api::token_eq(&self.0, submitted)
    }
}

impl SessionId {
    /// The cookie value.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn random_hex() -> String {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// A logged-in operator.
#[derive(Debug, Clone)]
pub struct Session {
    /// The CSRF token of its forms.
    pub csrf: CsrfToken,
    /// When it stops being accepted.
    pub expires: Instant,
}

/// Every live session and one-time code.
#[derive(Debug, Default)]
pub struct Sessions {
    live: Mutex<HashMap<SessionId, Session>>,
    codes: Mutex<HashMap<String, Instant>>,
}

impl Sessions {
    /// Starts a session; returns its id (for the cookie) and its state.
    pub fn create(&self) -> (SessionId, Session) {
        let now = Instant::now();
        let id = SessionId(random_hex());
        let s = Session {
            csrf: CsrfToken(random_hex()),
            expires: now + SESSION_TTL,
        };
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|_, s| s.expires > now);
        if live.len() >= MAX_SESSIONS {
            if let Some(oldest) = live
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
            {
                live.remove(&oldest);
            }
        }
        live.insert(id.clone(), s.clone());
        (id, s)
    }

    /// The live session with the cookie value `id`, if any.
    pub fn get(&self, id: &str) -> Option<(SessionId, Session)> {
        let key = SessionId(id.to_string());
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.get(&key)
            .filter(|s| s.expires > Instant::now())
            .map(|s| (key, s.clone()))
    }

    /// Ends a session (logout).
    pub fn remove(&self, id: &SessionId) {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// A new one-time login code, valid for [`ONE_TIME_TTL`].
    pub fn one_time_code(&self) -> String {
        let code = random_hex();
        let now = Instant::now();
        let mut codes = self.codes.lock().unwrap_or_else(|p| p.into_inner());
        codes.retain(|_, t| *t > now);
        codes.insert(code.clone(), now + ONE_TIME_TTL);
        code
    }

    /// Spends a one-time code: true once, for a code issued within its TTL.
    pub fn redeem(&self, code: &str) -> bool {
        let mut codes = self.codes.lock().unwrap_or_else(|p| p.into_inner());
        codes
            .remove(code)
            .is_some_and(|expires| expires > Instant::now())
    }
}

/// The session cookie's value in a `Cookie` request header, if present.
pub fn cookie_value(header: &str) -> Option<&str> {
    header
        .split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

/// `Set-Cookie` for a new session.
pub fn set_cookie(id: &SessionId) -> String {
    format!(
        "{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        id.as_str(),
        SESSION_TTL.as_secs()
    )
}

/// `Set-Cookie` that deletes the session cookie.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_codes_and_cookies() {
        let s = Sessions::default();
        let (id, sess) = s.create();
        assert_eq!(id.as_str().len(), 64);
        assert_ne!(id.as_str(), sess.csrf.as_str());
        let (got, g) = s.get(id.as_str()).expect("live");
        assert_eq!(got, id);
        assert!(g.csrf.matches(sess.csrf.as_str()));
        assert!(!g.csrf.matches(id.as_str()));
        assert!(!g.csrf.matches(""));
        assert!(s.get("not-a-session").is_none());
        s.remove(&id);
        assert!(s.get(id.as_str()).is_none());

        let code = s.one_time_code();
        assert!(!s.redeem("wrong"));
        assert!(s.redeem(&code));
        assert!(!s.redeem(&code), "a code works once");

        let h = format!("a=1; {COOKIE}=abc; b=2");
        assert_eq!(cookie_value(&h), Some("abc"));
        assert_eq!(cookie_value("a=1"), None);
        assert!(set_cookie(&id).contains("HttpOnly; SameSite=Strict"));
        assert!(clear_cookie().contains("Max-Age=0"));
    }
}
