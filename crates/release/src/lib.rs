//! Releases and release updates: the model behind `fleetdelta release-update`.
//!
//! A release is a set of services, each with an image, labels and an optional contract. A device
//! moves from the release it runs to a target release; the [`Transition`] between the two says,
//! per service, whether it is added, removed, unchanged, delta-updated or downloaded, how ready
//! it is, and which deltas it needs. Planning is pure: images and deltas come from an
//! [`ImageCatalog`] the caller provides, and nothing here touches the network.
//!
//! # Release files
//!
//! YAML, close to docker-compose (see `tests/fixtures/releases/` for commented examples):
//!
//! ```yaml
//! id: 2024.06.2              # required: the release id, one word (a version, a number)
//! commit: b2cf2db7fece36f1   # optional: what it was built from
//! os: '2.115.18'             # optional: the host OS version the release wants (one word);
//!                            # the device agent installs it once every service lock is free
//! environment:               # optional: variables of every service, under each service's own
//!   SITE: north              # (a change couples the services it changes: switched together)
//! services:                  # required, at least one; names are unique and follow compose
//!   api:                     # (letters, digits, '.', '_', '-')
//!     image: registry.example.com/fleet/api@sha256:...   # required, non-empty
//!     labels:                # optional: a mapping, or compose's list form `- key=value`
//!       io.balena.update.strategy: download-then-kill
//!     environment:           # optional: variables over the image's Env, either form too
//!       MODE: eco            # names: letters, digits, '_', not starting with a digit
//!     command: [serve, --port, '8080']   # optional: replaces the image's Cmd (list form)
//!     network_mode: host     # optional: none, host, bridge or a network's name
//!     restart: unless-stopped   # optional: no, always (the default), unless-stopped, on-failure
//!     replicas: 3            # optional (or deploy: {replicas: 3}): instances sharing the image
//!     healthcheck:           # optional, compose's: when an instance is ready
//!       test: [CMD, /app/ready]   # or [CMD-SHELL, "..."], a command string, or [NONE]
//!       interval: 2s         # durations: 500ms, 2s, 1m30s
//!       timeout: 1s
//!       retries: 3
//!       start_period: 10s
//!   gpu:
//!     image: oci:/var/lib/images/gpu:2024.06.2
//!     labels:
//!       io.balena.features.optional: '1'   # an unmet contract drops the service
//!     contract:              # optional: a balena container contract
//!       type: sw.container   # required, always sw.container
//!       slug: gpu-l4t        # required: one word
//!       name: GPU on L4T 32.4+   # optional
//!       requires:            # optional: all entries must hold
//!         - type: sw.l4t
//!           version: '>=32.4'
//!         - or:              # at least one must hold; groups do not nest
//!             - type: hw.device-type
//!               slug: jetson-nano
//!             - type: hw.device-type
//!               slug: jetson-tx2
//! ```
//!
//! Rules:
//! - Unknown keys are errors, at every level, and so are duplicate keys (service names, labels).
//!   Errors name the file, the field path (`services.gpu.contract.requires[0].version`) and,
//!   for YAML-level errors, the line.
//! - Scalars are kept as written. Unquoted decimals (`version: 32.2`, `id: 1.10`) are refused,
//!   since YAML reads `32.10` as the number 32.1: quote them. Integers are fine (`id: 900813`).
//! - An image reference is any reference fleetdelta's transports understand, kept as a string:
//!   it must be non-empty, without spaces, and if pinned (`...@sha256:<hex>`) by a valid digest,
//!   which the resolved image must then match.
//! - Label values are strings; numbers and booleans are read as their text (compose does the
//!   same). `io.balena.features.optional` takes `1`/`0` (also `true`/`false`, `on`/`off`), and
//!   `io.balena.update.strategy` one of balena's strategies. Balena's contract labels
//!   (`io.balena.features.requires.*`) are refused in favour of `contract`.
//! - Environment values are strings like label values (numbers and booleans read as text,
//!   unquoted decimals refused), without NUL; duplicate names are errors. A change of
//!   environment alone restarts the service without a download.
//! - `command`, `network_mode` and `restart` are how the device agent runs the service's
//!   container (compose's meaning); like the environment, a change of any of them restarts
//!   the service without a download. `command` is a non-empty list; `restart` one of compose's
//!   four policies. `replicas` (1 to 10 000) and `healthcheck` belong to the same settings:
//!   a change of either replaces the service's instances, a rolling start gated on readiness.
//! - Service names start with a letter or digit: they name directories on devices.
//! - Requirement types: `sw.supervisor`, `sw.os`, `sw.l4t`, `sw.kernel` take a `version`
//!   (`sw.os` may say `slug: balena-os`, `sw.kernel` `slug: linux`); `hw.device-type` and
//!   `arch.sw` take a `slug` (`arch.sw`: `aarch64`, `rpi`, `amd64`, `armv7hf`, `i386`), as in
//!   balena's contracts. Versions are node-semver ranges (`>=32.4`, `<14.5`, `28.2` meaning any
//!   28.2.x, `>=2.88 <3`, `a || b`); see [`version`] for how they compare.
//!
//! # Device facts files
//!
//! YAML (so JSON too), every key optional: `supervisor`, `os`, `l4t`, `kernel`, `device_type`,
//! `arch`; see [`DeviceFacts`]. A contract requiring a fact the file does not give is unmet.
//!
//! # Transitions
//!
//! See [`plan`] for contract checks and [`Transition`] for statuses and payload estimates; the
//! JSON form is documented in [`Transition::to_json`]'s module, the table in [`render_table`].
//! In short, per service of the target release:
//!
//! | situation | change | status | payload |
//! | --- | --- | --- | --- |
//! | not in the source release | `added` | `ready` | the whole image |
//! | in the source, not on the device (optional, contract unmet) | `download` | `ready` | the whole image |
//! | same image digest | `unchanged` | `unchanged` | 0 (not restarted) |
//! | different digest | `delta-update` | `pending`/`preparing`/`ready` as its delta | delta size, or missing layers |
//! | in the source only, or dropped from the target | `removed` | `ready` | 0 |
//!
//! The overall status is the least ready service status, `pending < preparing < ready`, with
//! `unchanged` counted as `ready`.
#![deny(missing_docs)]

mod catalog;
mod contract;
mod error;
mod facts;
mod file;
mod json;
mod requirements;
mod table;
mod transition;
pub mod version;
mod yaml;

pub use catalog::{DeltaStatus, ImageCatalog, ImagePair, LayerBlob, ResolvedImage};
pub use contract::Contract;
pub use error::{ReleaseError, UnmetContract};
pub use facts::{oci_architecture, DeviceFacts};
pub use file::{
    image_repository, parse_release_image, Healthcheck, Release, RunOptions, Service, LABEL_OPTIONAL, LABEL_REQUIRES_PREFIX, LABEL_UPDATE_STRATEGY,
    MAX_REPLICAS, RESTART_POLICIES, UPDATE_STRATEGIES,
};
pub use requirements::{Requirement, RequirementType, Requires, Unmet, Wanted, CONTAINER_CONTRACT_TYPE, KERNEL_SLUG, KNOWN_ARCHES, OS_SLUG};
pub use table::{human_size, render_table};
pub use transition::{
    plan, short_digest, Change, DeltaNeed, DroppedService, ImageInfo, Readiness, ReadyDelta, ReleaseRef, ServiceUpdate, Transition, UpdateStatus,
};

/// Largest release or facts file read (far above any real one; bounds what a typo in a path
/// can make us load).
pub const MAX_FILE_BYTES: u64 = 1 << 20;
