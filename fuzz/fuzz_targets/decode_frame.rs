//! Fuzz target: any bytes given to the frame decoder (and, when they parse as a CAR, to the
//! CAR reader) must yield a value or an error, never a panic.
//!
//! Run with `cargo +nightly fuzz run decode_frame` from the crate root; seed the corpus with
//! frames from `fixtures/firehose/small.frames` for coverage of the deep paths.
#![no_main]

use atproto_ingest::firehose::car::Car;
use atproto_ingest::firehose::frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(decoded) = frame::decode(data) {
        // Touch the decoded event so nothing is optimised away.
        let _ = decoded.event.kind.type_name();
    }
    if let Ok(car) = Car::parse(data) {
        let _ = car.get_verified(&cid::Cid::default());
    }
});
