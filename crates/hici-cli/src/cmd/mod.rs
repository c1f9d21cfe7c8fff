//! One file per subcommand.

pub mod bench;
pub mod chat;
pub mod devices;
pub mod generate;
pub mod import;
pub mod inspect;
pub mod parity;
pub mod passkey;
pub mod perplexity;
pub mod serve;
