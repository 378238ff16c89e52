//! The binary translator (work in progress; see docs/architecture.md).
//!
//! Today: [`lower`] re-encodes innocuous guest instructions for the host,
//! and [`straight`] compiles a straight-line run of copied instructions
//! into host code (dynasmrt) that runs on the guest window through the GS
//! segment base. Both are checked against the reference interpreter on the
//! differential harness's random sequences. The dispatcher, translation
//! cache, chaining, helper calls for special instructions and fault
//! handling come next.

pub mod code_buffer;
pub mod engine;
pub mod fault;
pub mod lower;
pub mod straight;

pub use lower::{lower, Lowering};
