//! The answer to GetListOfPortMappings: the SOAP envelope with the listing escaped inside it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use natbinder::gateway::igd_soap::parse_get_list_of_port_mappings_response;

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = std::str::from_utf8(data) {
        let _ = parse_get_list_of_port_mappings_response(body);
    }
});
