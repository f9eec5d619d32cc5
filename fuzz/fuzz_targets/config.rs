//! Configuration loading: any text -> a validated `Config` or an error, as `check` and `run`
//! do (`Config::load` is this plus reading the file).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sekoia_forwarder::config::Config;

fuzz_target!(|data: &[u8]| {
    // `Config::load` reads the file with `read_to_string`: text that is not UTF-8 never
    // reaches the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, Path::new("fuzz.toml")) {
        Ok(config) => assert!(
            config.validate().is_ok(),
            "parse returned an invalid config"
        ),
        // The message is what the user reads: building it must not fail either.
        Err(e) => drop(e.to_string()),
    }
});
