// The kernel programs are the `enforcer` binary target (src/main.rs), built for
// bpfel-unknown-none by aya-build. This empty library exists so that
// `enforcer` can list this crate as a build-dependency and be rebuilt when the
// kernel programs change.
#![no_std]
