//! A NAT-PMP or PCP reply, or an announcement on 224.0.0.1:5350: any LAN host can send one. Decoding
//! must never panic, and whatever it accepts must respect the sizes RFC 6886 and RFC 6887 allow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use natbinder::gateway::pmp_wire::{parse_reply, Reply, PCP_MAX_MESSAGE};

fuzz_target!(|data: &[u8]| {
    match parse_reply(data) {
        Ok(Reply::NatPmp(reply)) => {
            assert!((8..=16).contains(&data.len()), "accepted a {}-byte NAT-PMP reply", data.len());
            // The log lines built from a reply must not panic either.
            let _ = reply.result.to_string();
        }
        Ok(Reply::Pcp(reply)) => {
            assert!(
                data.len() >= 24 && data.len() <= PCP_MAX_MESSAGE && data.len().is_multiple_of(4),
                "accepted a {}-byte PCP message",
                data.len()
            );
            let _ = reply.result.to_string();
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
});
