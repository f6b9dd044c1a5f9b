//! Support code for the kernel integration tests.
