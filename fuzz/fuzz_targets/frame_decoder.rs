//! Feeds arbitrary bytes to the frame header validator and every metadata decoder of djinn-proto
//! (`djinn_proto::check_frame_bytes`, which the corpus replay test runs too). The property: nothing
//! panics and nothing allocates beyond the input (run with -malloc_limit_mb to catch that).
//!
//! Run (stable toolchain, no sanitizer):
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run -s none frame_decoder corpus/frame_decoder -- -runs=12000000`
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| djinn_proto::check_frame_bytes(data));
