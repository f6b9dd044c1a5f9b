//! Support code for the kernel integration tests.

pub mod dns;
