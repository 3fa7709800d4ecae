//! Where a console keeps its sessions and login codes: [`SessionStore`].
//!
//! A daemon keeps them in memory ([`Sessions`]); a server of which several run side by
//! side (the fleet's control plane) keeps them where every one of them sees them, so that
//! a browser may be answered by any. The console asks the store for nothing else, and
//! every answer may fail (the store is away): the request is then refused with the
//! store's error, and nothing is opened that was not stored.

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use crate::sessions::{Active, Opened, Sessions, Settings};

/// What a store's methods return: a future of the answer or of what went wrong.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

/// Sessions and one-time login codes, as [`Sessions`] describes them: the same lifetimes
/// ([`Settings`]), budgets, and secrets kept only as their SHA-256.
pub trait SessionStore: Send + Sync + 'static {
    /// The lifetimes and budgets in force.
    fn settings(&self) -> Settings;
    /// A new one-time login code for `principal`.
    fn issue_code<'a>(&'a self, principal: &'a str) -> StoreFuture<'a, String>;
    /// The principal an unused, unexpired `code` was issued to, without using it.
    fn peek_code<'a>(&'a self, code: &'a str) -> StoreFuture<'a, Option<String>>;
    /// Uses `code`: its principal, once; `None` when it is unknown, used or expired.
    fn redeem_code<'a>(&'a self, code: &'a str) -> StoreFuture<'a, Option<String>>;
    /// Opens a session for `principal`.
    fn open<'a>(&'a self, principal: &'a str) -> StoreFuture<'a, Opened>;
    /// The live session of cookie value `id`, marked as used now.
    fn active<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<Active>>;
    /// Ends the session of cookie value `id`; what it was, if it was live.
    fn close<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<Active>>;
}

fn ready<'a, T: Send + 'a>(value: T) -> StoreFuture<'a, T> {
    Box::pin(std::future::ready(Ok(value)))
}

impl SessionStore for Sessions {
    fn settings(&self) -> Settings {
        Sessions::settings(self)
    }
    fn issue_code<'a>(&'a self, principal: &'a str) -> StoreFuture<'a, String> {
        ready(Sessions::issue_code(self, principal, Instant::now()))
    }
    fn peek_code<'a>(&'a self, code: &'a str) -> StoreFuture<'a, Option<String>> {
        ready(Sessions::peek_code(self, code, Instant::now()))
    }
    fn redeem_code<'a>(&'a self, code: &'a str) -> StoreFuture<'a, Option<String>> {
        ready(Sessions::redeem_code(self, code, Instant::now()))
    }
    fn open<'a>(&'a self, principal: &'a str) -> StoreFuture<'a, Opened> {
        ready(Sessions::open(self, principal, Instant::now()))
    }
    fn active<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<Active>> {
        ready(Sessions::active(self, id, Instant::now()))
    }
    fn close<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<Active>> {
        ready(Sessions::close(self, id, Instant::now()))
    }
}
