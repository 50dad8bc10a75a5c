//! Fuzz target: the Dockerfile parser (`kiln::engine::dockerfile::fuzz_parse`) on arbitrary
//! bytes (read as lossy UTF-8). It must never panic, overflow the stack or hang; a parse
//! error is the expected answer to garbage. A Dockerfile that parses is also rendered back
//! instruction by instruction, which must not panic either.
#![no_main]

use kiln::engine::dockerfile::{display_instruction, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kiln::engine::dockerfile::fuzz_parse(data);
    if let Ok(dockerfile) = parse(&String::from_utf8_lossy(data)) {
        for stage in &dockerfile.stages {
            for instruction in &stage.instructions {
                let _ = display_instruction(&instruction.inner);
            }
        }
    }
});
