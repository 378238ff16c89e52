//! What the translator needs from the host: the code buffer (W^X), the
//! fault handler that turns a host fault in translated code into a
//! precise guest fault, and the GS base that points at the guest window.
//!
//! Most of the translator's `unsafe` lives here and in [`crate::emit`]'s
//! entry trampoline; each block carries its `// SAFETY:` argument.

pub mod code_buffer;
pub mod direct_map;
pub mod fault;
pub mod gs;
pub mod poll;

pub use code_buffer::CodeBuffer;
pub use direct_map::DirectMap;
pub use gs::{gs_base, host_fixed_flags, set_gs_base};
pub use poll::Poller;
