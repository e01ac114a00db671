//! A ring-buffer record from the eBPF programs. The kernel is trusted, but a daemon/kernel mismatch
//! (an old object, a changed layout) must end in an error, not a crash.
#![no_main]

use libfuzzer_sys::fuzz_target;
use natbinder::kernel::KernelEvent;

fuzz_target!(|data: &[u8]| {
    let _ = KernelEvent::decode(data);
});
