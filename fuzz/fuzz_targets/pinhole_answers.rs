//! The answers of a WANIPv6FirewallControl:1 gateway, and the control URL its description gives. The
//! first byte picks what the rest is read as: one of the seven actions' answers, or a control URL.
//! Whatever is accepted must be what the service can send; error messages must not panic either.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV6};

use libfuzzer_sys::fuzz_target;
use natbinder::gateway::{
    igd_pinhole::{
        parse_add_pinhole_response, parse_check_pinhole_working_response, parse_delete_pinhole_response,
        parse_get_firewall_status_response, parse_get_outbound_pinhole_timeout_response,
        parse_get_pinhole_packets_response, parse_update_pinhole_response, PinholeEndpoint, PinholeError,
    },
    AddError,
};

const SOURCE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x20);
const ROUTER: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
const IPV4_GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);

/// An error's messages, including the reconciler's view of it, must be printable.
fn exercise<T>(result: Result<T, PinholeError>) {
    if let Err(error) = result {
        let _ = error.to_string();
        let _ = (error.is_no_such_entry(), error.pinholes_unavailable());
        let _ = AddError::from(error).to_string();
    }
}

fuzz_target!(|data: &[u8]| {
    let [selector, body @ ..] = data else { return };
    let Ok(body) = std::str::from_utf8(body) else { return };
    match selector % 8 {
        0 => exercise(parse_add_pinhole_response(body)),
        1 => exercise(parse_update_pinhole_response(body)),
        2 => exercise(parse_delete_pinhole_response(body)),
        3 => exercise(parse_get_firewall_status_response(body)),
        4 => exercise(parse_get_outbound_pinhole_timeout_response(body)),
        5 => exercise(parse_check_pinhole_working_response(body)),
        6 => exercise(parse_get_pinhole_packets_response(body)),
        _ => {
            let gateway = SocketAddrV6::new(ROUTER, 5000, 0, 3);
            match PinholeEndpoint::new(SOURCE, gateway, IpAddr::V4(IPV4_GATEWAY), body) {
                // Requests may only ever go to the gateway's own IPv6 address, on its link.
                Ok(endpoint) => {
                    assert_eq!(*endpoint.gateway().ip(), ROUTER, "sent elsewhere: {body:?}");
                    assert_eq!(endpoint.gateway().scope_id(), 3, "sent on another link: {body:?}");
                    assert_ne!(endpoint.gateway().port(), 0, "sent to port 0: {body:?}");
                    assert!(endpoint.control_path().starts_with('/'), "not a path: {body:?}");
                    let _ = endpoint.to_string();
                }
                Err(error) => exercise::<()>(Err(error)),
            }
        }
    }
});
