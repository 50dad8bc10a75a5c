//! Fuzz target: image reference parsing (`ImageRef::from_str`, and `Digest::from_str` on
//! the same text). Garbage must be refused with an error, never a panic; a reference that
//! parses must print to a string that parses back to the same reference (the canonical form
//! is a fixed point), since Kiln stores and compares references by their printed form.
#![no_main]

use kiln::model::{Digest, ImageRef};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = text.parse::<Digest>();
    if let Ok(image) = text.parse::<ImageRef>() {
        let printed = image.to_string();
        let again: ImageRef = printed
            .parse()
            .unwrap_or_else(|e| panic!("{text:?} parsed, but its printed form {printed:?} does not: {e}"));
        assert_eq!(again, image, "{text:?} → {printed:?} parses to another reference");
        assert_eq!(again.to_string(), printed, "printing is not stable for {text:?}");
    }
});
