//! Rules: parsing profiles (`profile`, `target`) and compiling them into
//! kernel map entries (`compile`). Nothing here touches the kernel.

pub mod compile;
pub mod files;
pub mod guard;
pub mod profile;
pub mod target;

pub use profile::{Action, Mode, Profile, ProfileSet};
