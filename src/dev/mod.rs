//! Developer tools that ship in the binary: micro-benchmarks (`repnoise bench`) and the bodies of
//! the fuzz targets.

pub mod bench;
pub mod fuzzing;
