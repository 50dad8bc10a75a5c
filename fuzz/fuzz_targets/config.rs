//! Fuzz target: the config file (`Config::parse`, then `Config::validate` on what parses).
//! Any text must give a config or an error naming what is wrong, never a panic (TOML
//! nesting, huge numbers, odd durations and addresses included).
#![no_main]

use kiln::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::parse(text) {
        let _ = config.validate();
    }
});
