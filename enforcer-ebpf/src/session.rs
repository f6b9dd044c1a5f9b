//! Which session, if any, the current task belongs to.

use aya_ebpf::helpers::generated::bpf_get_current_ancestor_cgroup_id;
use enforcer_common::{Counter, Session};

use crate::maps::{SESSIONS, count};

/// Set by the controller at load time (read-only globals).
#[unsafe(no_mangle)]
static INSTANCE_CGROUP_ID: u64 = 0;
#[unsafe(no_mangle)]
pub(crate) static INSTANCE_CGROUP_LEVEL: i32 = 0;

#[derive(Clone, Copy)]
pub enum Lookup {
    /// Not in this controller's cgroup tree: not ours to judge.
    Outside,
    /// In a registered session (or a cgroup below one).
    Inside(u64, Session),
    /// In our tree but not in a registered session: deny, fail closed.
    Unknown(u64),
}

/// Find the current task's session by its ancestor at the session level, so
/// cgroups the agent creates below its session cgroup stay enforced. Two
/// helper calls and one hash lookup; a task outside the tree pays one call.
#[inline(always)]
pub fn current() -> Lookup {
    // SAFETY: globals are plain integers written before load.
    let instance = unsafe { core::ptr::read_volatile(&raw const INSTANCE_CGROUP_ID) };
    let level = unsafe { core::ptr::read_volatile(&raw const INSTANCE_CGROUP_LEVEL) };
    // SAFETY: helper with a plain integer argument.
    let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
    if ancestor != instance || instance == 0 {
        return Lookup::Outside;
    }
    // SAFETY: as above.
    let session_cgroup = unsafe { bpf_get_current_ancestor_cgroup_id(level + 1) };
    // SAFETY: the value is copied out before the map can change under it.
    if let Some(session) = unsafe { SESSIONS.get(session_cgroup) } {
        Lookup::Inside(session_cgroup, *session)
    } else {
        count(Counter::UnknownSession);
        Lookup::Unknown(session_cgroup)
    }
}
