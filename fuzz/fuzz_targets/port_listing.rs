//! The PortMappingList document on its own: through the envelope the fuzzer would first have to learn
//! the escaping, so this reaches the entry checks much sooner.
#![no_main]

use libfuzzer_sys::fuzz_target;
use natbinder::gateway::igd_soap::parse_port_listing;

fuzz_target!(|data: &[u8]| {
    if let Ok(listing) = std::str::from_utf8(data) {
        let _ = parse_port_listing(listing);
    }
});
