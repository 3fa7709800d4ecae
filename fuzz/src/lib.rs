//! Shared pieces of the fuzz targets (in `fuzz_targets/`): how an input becomes a shared
//! region ([`image`]) or a script of operations ([`script`]), what is done with the
//! endpoints ([`exercise`]), and the host's VM driver against a scripted guest ([`driver`]). The seed corpus in `corpus/` is written by the `seeds` test
//! module from real encodings: `cargo test --manifest-path fuzz/Cargo.toml -- --ignored`.

pub mod driver;
pub mod exercise;
pub mod image;
pub mod script;

#[cfg(test)]
mod seeds;
