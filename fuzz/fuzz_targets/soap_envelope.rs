//! Any SOAP answer: envelope, Body, an action's output arguments or a Fault's UPnPError.
#![no_main]

use libfuzzer_sys::fuzz_target;
use natbinder::gateway::igd_soap::parse_soap_response;

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = std::str::from_utf8(data) {
        let _ = parse_soap_response(body, "GetSpecificPortMappingEntry");
    }
});
