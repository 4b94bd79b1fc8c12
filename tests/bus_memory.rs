//! The conformance suite on the memory bus.
mod common;

use chat_relay::bus::memory::{MemoryBus, MemoryConfig};

fn bus() -> MemoryBus {
    MemoryBus::new(MemoryConfig::default())
}

conformance_tests!(bus());
