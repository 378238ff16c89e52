//! The binary translator: guest x86-32 blocks to host x86-64 code.
//!
//! ```text
//!            ┌──────────── dispatch (the dispatcher: routes every exit) ◀───────────────┐
//!            │  drain the write watch (watch) ─ follow the paging mode (paging)         │
//!            ▼                                                                          │
//!   cache lookup (cache) ──miss──▶ scan (popek_decode) ─▶ select ─▶ lower / emit        │
//!            │                                                 └─▶ link (chain)         │
//!            ▼                                                                          │
//!   host code (emit: prologue, body, stubs) ──chained jumps / indirect table──▶ host code
//!            │            └─ helper calls (helper) ─▶ vcpu methods, interpreter         │
//!            └── exit: stub, budget, helper, fault (host::fault), stop ─────────────────┘
//! ```
//!
//! Register map while guest code runs (see [`emit`]): guest EAX, ECX, EDX,
//! EBX, EBP, ESI, EDI in the host registers of the same numbers; guest ESP
//! in R12D; R13 scratch (and the target of an indirect exit); R15 the
//! [`abi::Context`]; with counting ([`Pacing::Counted`]) R14 is the
//! chaining budget and R8 counts retired guest instructions (and indirect
//! lookups above bit 24); without it, translated code polls a page at
//! backward and indirect transfers ([`host::poll`]). Guest memory is
//! `gs:[addr32]`: GS is the 4 GiB window of guest physical memory, or the
//! shadow window of linear memory when the guest pages.
//!
//! Flag invariant: the guest's arithmetic flags and DF are the host's
//! while guest code runs; IF and the other system flags are virtual in the
//! context ([`abi`]). Stubs, counting, the budget, polls and lookups use
//! only instructions that leave flags alone (LEA, MOV, JRCXZ, JMP).
//!
//! Fault invariant: a host fault inside translated code leaves the guest
//! state exactly as it was before the faulting guest instruction (x86
//! faults are precise, and every lowering puts its only faulting access
//! first); the dispatcher finds that instruction through the block's side
//! table and the interpreter executes it with the guest's semantics.
//!
//! The life of a block: the dispatcher misses in the cache (keyed by EIP,
//! the physical page of EIP and the privilege); `select` lowers each
//! instruction and `emit` compiles the block into the code buffer; the
//! write watch is told which bytes of which physical pages it came from
//! and which page-table entries mapped them; `chain` patches waiting stubs
//! to it and publishes it in the indirect-branch table. It runs until a
//! write overlaps its bytes or changes an entry that mapped them (the next
//! drain drops it and unlinks it), an eviction, or a full code buffer
//! (which flushes everything). A CR3 load or a change of privilege drops
//! nothing: it switches shadow address spaces ([`paging`]).

#![warn(missing_docs)]

pub mod abi;
pub mod cache;
pub mod chain;
pub mod dispatch;
pub mod dump;
pub mod emit;
pub mod helper;
pub mod host;
pub mod lower;
pub mod paging;
pub mod select;
pub mod stats;
pub mod watch;

pub use dispatch::{Bt, Pacing, CHAIN_BUDGET, CODE_BUFFER_SIZE};
pub use lower::{lower, Lowering};
pub use stats::{Counter, ExitReason, KindCounts, Stats};
