//! Settings values from the environment and their defaults, written once.
//!
//! Every setting is a clap `#[arg(long, env, default_value…)]` attribute,
//! and that attribute is the only place its default is written: `Default` for a
//! settings struct parses an empty command line through the same clap
//! definition, so the defaults (and any environment override, e.g. the broker
//! URLs the tests read) cannot drift apart.

use clap::{Args, FromArgMatches};

/// A settings struct from the environment and its clap defaults.
pub fn from_env<T: Args + FromArgMatches>() -> Result<T, clap::Error> {
    let cmd = T::augment_args(clap::Command::new("chat-relay").no_binary_name(true));
    let matches = cmd.try_get_matches_from(std::iter::empty::<String>())?;
    T::from_arg_matches(&matches)
}

/// Implements `Default` for settings structs through [`from_env`]. Panics only
/// when the environment holds an invalid value for one of the struct's own
/// variables — a start-up mistake, reported with clap's message.
#[macro_export]
macro_rules! default_from_env {
    ($($t:ty),+ $(,)?) => {$(
        impl Default for $t {
            fn default() -> Self {
                match $crate::settings::from_env::<$t>() {
                    Ok(v) => v,
                    Err(e) => panic!("invalid setting in the environment: {e}"),
                }
            }
        }
    )+};
}
