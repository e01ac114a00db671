//! The answer to GetSpecificPortMappingEntry. The first three bytes pick the request's key (protocol and
//! external port) so that the echoed-key checks are reached with both matching and other values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use natbinder::{gateway::igd_soap::parse_get_specific_port_mapping_entry_response, Protocol};

fuzz_target!(|data: &[u8]| {
    let [protocol, port_high, port_low, body @ ..] = data else { return };
    let protocol = if protocol & 1 == 0 { Protocol::Tcp } else { Protocol::Udp };
    let external_port = u16::from_be_bytes([*port_high, *port_low]);
    if let Ok(body) = std::str::from_utf8(body) {
        let _ = parse_get_specific_port_mapping_entry_response(body, protocol, external_port);
    }
});
