//! Shared pieces of the ring-protocol fuzz targets (in `fuzz_targets/`): how an input becomes
//! a shared region ([`image`]) or a script of operations ([`script`]), and what is done with
//! the endpoints ([`exercise`]). The seed corpus in `corpus/` is written by the `seeds` test
//! module from real encodings: `cargo test --manifest-path fuzz/Cargo.toml -- --ignored`.

pub mod exercise;
pub mod image;
pub mod script;

#[cfg(test)]
mod seeds;
