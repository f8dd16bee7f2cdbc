//! Behavioral threat detection: rules as small verified VMs.
//!
//! Design: a rule is a [`program::Program`] (versioned bytes, decoded and
//! verified all-or-nothing by [`program::decode`]); an [`engine::Engine`] runs
//! a set of them over events, one instance per (rule, context, wait point).
//! The pure-Python model `vmkernel/reference/rulevm.py` defines the
//! behaviour, step counts included; [`jsonl`] parses JSON Lines input.

pub mod engine;
pub mod jsonl;
pub mod program;
pub mod value;

#[cfg(test)]
mod tests;

pub use engine::{Determination, Engine, Event, STAT_NAMES};
pub use program::{decode, Program, VerifyError};
pub use value::{Scalar, Value};
