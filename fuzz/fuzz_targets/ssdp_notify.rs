//! An SSDP datagram on 239.255.255.250:1900: any LAN device can send one. Parsing and the restart
//! detector must never panic, whatever arrives.
#![no_main]

use libfuzzer_sys::fuzz_target;
use natbinder::gateway::ssdp_notify::{parse_notify, RestartDetector};

fuzz_target!(|data: &[u8]| {
    let mut detector = RestartDetector::default();
    // Feed the datagram and each of its halves, so that the detector sees sequences too.
    for part in [data, &data[..data.len() / 2], &data[data.len() / 2..], data] {
        if let Some(notify) = parse_notify(part) {
            let _ = notify.is_gateway();
            let _ = detector.changed(&notify);
        }
    }
});
