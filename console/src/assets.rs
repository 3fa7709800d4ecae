//! The console's static files, compiled into the binary: nothing is fetched from anywhere
//! but the server itself.

use std::sync::OnceLock;

use sha2::{Digest, Sha256};

/// A file served under `/console/assets/`.
#[derive(Debug)]
pub struct Asset {
    /// Its name in the URL.
    pub name: &'static str,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Its bytes.
    pub body: &'static str,
    etag: OnceLock<String>,
}

impl Asset {
    const fn new(name: &'static str, content_type: &'static str, body: &'static str) -> Self {
        Self {
            name,
            content_type,
            body,
            etag: OnceLock::new(),
        }
    }

    /// Its URL path.
    pub fn path(&self) -> String {
        format!("/console/assets/{}", self.name)
    }

    /// Its entity tag: a quoted prefix of the SHA-256 of its bytes.
    pub fn etag(&self) -> &str {
        self.etag.get_or_init(|| {
            let d = Sha256::digest(self.body.as_bytes());
            format!("\"{}\"", hex::encode(&d[..12]))
        })
    }
}

/// The page's one ES module.
pub static APP: Asset = Asset::new(
    "app.js",
    "text/javascript; charset=utf-8",
    include_str!("../assets/app.js"),
);

/// The style sheet.
pub static STYLE: Asset = Asset::new(
    "style.css",
    "text/css; charset=utf-8",
    include_str!("../assets/style.css"),
);

/// The asset named `name`.
pub fn find(name: &str) -> Option<&'static Asset> {
    [&APP, &STYLE].into_iter().find(|a| a.name == name)
}
