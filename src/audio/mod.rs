//! Audio front ends.
pub mod mel;
