#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
//!
//! # Crates
//!
//! This crate is the `fleetdelta` command and a facade over the workspace's libraries, each
//! re-exported under the name it has here:
//!
//! - `fleetdelta-engine` (everything at this crate's root: [`diff`](mod@diff), [`apply`](mod@apply), [`image`],
//!   [`registry`], [`transfer`], [`format`](mod@format)…): the delta engine; depends on no other crate
//!   of the workspace;
//! - `fleetdelta-release` ([`release`]): the release model, pure;
//! - `fleetdelta-pull` ([`pull`](mod@pull)): a device's download of an image, and the builder
//!   service's wire types and client;
//! - `fleetdelta-service` ([`service`], [`release_update`]): the builder service (feature
//!   `service`, on by default; a device build leaves it out);
//! - `fleetdelta-agent` ([`agent`]): the device agent.

pub use fleetdelta_engine::*;

pub use fleetdelta_agent as agent;
pub use fleetdelta_pull as pull;
pub use fleetdelta_pull::{pull, PullOptions, PullReport};
pub use fleetdelta_release as release;
#[cfg(feature = "service")]
pub use fleetdelta_service as service;
#[cfg(feature = "service")]
pub use fleetdelta_service::release_update;
