//! Message ids: ULIDs from one monotonic generator per process, so ids sort by
//! time and, within this process, strictly in the order they were made.

use std::sync::Mutex;

#[derive(Default)]
pub struct IdGen(Mutex<ulid::Generator>);

impl IdGen {
    pub fn next(&self) -> String {
        let mut g = match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        // `generate` only fails when 2^80 ids were made in one millisecond;
        // fall back to a fresh random ULID then.
        g.generate()
            .unwrap_or_else(|_| ulid::Ulid::new())
            .to_string()
    }
}
