//! The OCI distribution API: an async client (reqwest + tokio) that resolves tags and
//! digests, fetches manifests, indexes and blobs, and pushes them back.
//!
//! - [`reference`](mod@reference) parses `HOST[:PORT]/REPO[:TAG][@DIGEST]`.
//! - [`auth`] reads challenges, credentials (docker and podman auth files), tokens.
//! - [`client`] sends requests with authentication, retries with backoff, manifests.
//! - [`blobs`] does resumable verified downloads; uploads with mount, in one request or chunks.
//! - [`referrers`] lists the manifests that refer to a subject (how deltas of a target are found).
//! - [`tags`] lists a repository's tags and deletes manifests (what [`crate::retention`] needs).
//!
//! Moving whole images between layouts and registries is [`crate::transfer`]'s job.

pub mod auth;
pub mod blobs;
pub mod client;
pub mod reference;
pub mod referrers;
pub mod tags;

pub use auth::{CredentialStore, Credentials};
pub use blobs::{BlobPush, Download};
pub use client::{Client, ClientOptions, FetchedManifest};
pub use reference::RegistryRef;
pub use referrers::Referrer;
