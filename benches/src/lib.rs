//! Criterion benchmarks for Portless; see `benches/`.
