//! Audio front ends.
pub mod mel;
pub mod resample;
pub mod wav;
