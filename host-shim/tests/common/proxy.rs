//! A TCP relay on loopback that a test can cut: every connection through it is closed at
//! once, as a dropped network would, and what each connection's client sent first is kept
//! so that the test can see how it came back (a resumed event stream's `Last-Event-ID`).
#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;

/// The relay: listens on `127.0.0.1:0` and forwards to one upstream address.
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// The client side of every open connection.
    open: Mutex<Vec<TcpStream>>,
    /// The first bytes (up to 4 KiB) each connection's client sent, in order of arrival.
    heads: Mutex<Vec<String>>,
}

impl Relay {
    /// Starts relaying to `upstream`.
    pub fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay listener");
        let addr = listener.local_addr().expect("relay address");
        let shared = Arc::new(Shared::default());
        let s = Arc::clone(&shared);
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                if let Ok(c) = client.try_clone() {
                    s.open
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(c);
                }
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                let first = Arc::clone(&s);
                thread::spawn(move || pump(client, server, Some(first)));
                thread::spawn(move || pump(s2, c2, None));
            }
        });
        Self { addr, shared }
    }

    /// The address to connect to instead of the upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every connection open now; returns how many there were.
    pub fn cut(&self) -> usize {
        let open = std::mem::take(
            &mut *self
                .shared
                .open
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for c in &open {
            let _ = c.shutdown(Shutdown::Both);
        }
        open.len()
    }

    /// What each connection's client sent first, oldest first.
    pub fn heads(&self) -> Vec<String> {
        self.shared
            .heads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Copies `from` to `to` until either closes, then closes both; records the first read when
/// `first` is given.
fn pump(mut from: TcpStream, mut to: TcpStream, mut first: Option<Arc<Shared>>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(s) = first.take() {
            let head = String::from_utf8_lossy(&buf[..n.min(4096)]).into_owned();
            s.heads
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(head);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
