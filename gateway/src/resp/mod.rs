//! The Redis-protocol (RESP2/RESP3) server: what lets any Redis client publish to and subscribe
//! on herald unchanged.
//!
//! The split follows mini-redis: [`frame`] encodes replies, [`parse`] turns bytes into requests,
//! `connection` runs one client, `cmd` holds one module per command family, and [`server`]
//! accepts clients.

mod clients;
mod cmd;
mod connection;
pub mod frame;
pub mod parse;
pub mod server;
pub mod settings;

pub use server::{AdoptedClient, BindError, RespServer, ServerContext};
pub use settings::RespSettings;
