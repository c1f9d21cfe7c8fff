//! One file per subcommand.

pub mod chat;
pub mod devices;
pub mod generate;
pub mod inspect;
pub mod passkey;
pub mod perplexity;
