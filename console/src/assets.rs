//! The console's static files, compiled into the binary: nothing is fetched from anywhere
//! but the server itself.

use std::io::Write as _;
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
    gzip: OnceLock<Vec<u8>>,
}

impl Asset {
    const fn new(name: &'static str, content_type: &'static str, body: &'static str) -> Self {
        Self {
            name,
            content_type,
            body,
            etag: OnceLock::new(),
            gzip: OnceLock::new(),
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

    /// Its bytes compressed with gzip (at the best level, once, on first use).
    pub fn gzip(&self) -> &[u8] {
        self.gzip.get_or_init(|| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            // Writing to a Vec cannot fail.
            let _ = e.write_all(self.body.as_bytes());
            e.finish().unwrap_or_default()
        })
    }

    /// The entity tag of the gzip form (a representation of its own).
    pub fn gzip_etag(&self) -> String {
        let plain = self.etag();
        format!("{}-gz\"", &plain[..plain.len() - 1])
    }
}

/// Whether an `Accept-Encoding` value accepts gzip: `gzip` (or `x-gzip`) with a quality
/// above 0, or else `*` with one; a listed `gzip;q=0` refuses it whatever `*` says.
pub fn accepts_gzip(accept_encoding: &str) -> bool {
    let (mut gzip, mut star) = (None::<f32>, None::<f32>);
    for item in accept_encoding.split(',') {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            gzip = Some(gzip.map_or(q, |g| g.max(q)));
        } else if coding == "*" {
            star = Some(q);
        }
    }
    gzip.or(star).is_some_and(|q| q > 0.0)
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
