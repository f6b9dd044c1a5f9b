//! DNS-aware host rules: the proxy that every session's DNS queries are
//! steered to (`proxy`), what a profile says about a name (`names`), and
//! the addresses learned from answers (`learned`).

pub mod learned;
pub mod names;
pub mod proxy;
