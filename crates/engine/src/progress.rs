//! Progress reporting hooks, so that front ends can show bars without the library knowing how.

/// Receives progress from long operations. All methods default to doing nothing.
pub trait Progress: Sync {
    /// A new stage starts, measured in `total` units (bytes).
    fn stage(&self, _name: &str, _total: u64) {}
    /// `n` more units of the current stage are done.
    fn advance(&self, _n: u64) {}
    /// The operation is over.
    fn finish(&self) {}
}

/// Reports nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Silent;

impl Progress for Silent {}
