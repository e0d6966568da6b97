//! The write-ahead journal: one JSON record per line, each synced to disk before the agent
//! acts on it.
//!
//! An update opens with `begin` (the whole plan), then each step of each service is journaled
//! `begun` before it is done and `done` after; a service whose switch failed gets
//! `rolled-back`; `end` closes the update, and the journal is then emptied. After a crash,
//! [`Journal::open`] replays what is there: the plan, and the steps done, begun or rolled back.
//! A last line without its newline is a write the crash cut short: it is ignored, since the
//! step it announced was not started.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::AgentError;
use super::plan::UpdatePlan;
use super::state::sync_parent;
use super::strategy::Step;
use crate::error::Result;
use fleetdelta_engine::error::IoContext;

/// The journal's name for the OS update, which is not a service.
pub const OS_UPDATE: &str = "@os-update";

/// One journal record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "kebab-case")]
pub enum Record {
    /// An update starts, with its plan.
    Begin {
        /// The plan.
        plan: UpdatePlan,
    },
    /// A step is about to be done.
    Begun {
        /// The service (or [`OS_UPDATE`]).
        service: String,
        /// The step's index in the service's steps.
        index: usize,
        /// The step, for people reading the journal.
        step: Step,
    },
    /// A step is done.
    Done {
        /// The service.
        service: String,
        /// The step's index.
        index: usize,
    },
    /// A service's update failed and it runs its old instance again.
    RolledBack {
        /// The service.
        service: String,
        /// Why.
        reason: String,
    },
    /// A newer target release replaced the update: its switches under way were finished, the
    /// rest is abandoned (an `end` follows).
    Superseded {
        /// The newer release.
        by: String,
    },
    /// The update is over.
    End,
}

/// What a journal holds about an unfinished update.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replay {
    /// The plan of the update, when one was begun and not ended.
    pub plan: Option<UpdatePlan>,
    /// Per service, the number of steps done (steps are done in order).
    pub done: BTreeMap<String, usize>,
    /// Per service, the step begun and not done (at most one).
    pub begun: BTreeMap<String, usize>,
    /// Services rolled back.
    pub rolled_back: BTreeSet<String>,
}

/// The journal file, open for appending.
#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
}

impl Journal {
    /// Opens the journal and replays it.
    pub fn open(path: &Path) -> Result<(Journal, Replay)> {
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(path).ctx(|| format!("opening {}", path.display()))?;
        let mut text = String::new();
        file.read_to_string(&mut text).ctx(|| format!("reading {}", path.display()))?;
        let replay = replay(&text, path)?;
        if !text.is_empty() && !text.ends_with('\n') {
            // Cut the torn line, so that the next record starts on a line of its own.
            let keep = text.rfind('\n').map_or(0, |i| i + 1);
            file.set_len(keep as u64).ctx(|| format!("truncating {}", path.display()))?;
        }
        Ok((Journal { file, path: path.to_path_buf() }, replay))
    }

    /// Appends a record and syncs it to disk.
    pub fn append(&mut self, record: &Record) -> Result<()> {
        let mut line = serde_json::to_vec(record).expect("records serialize");
        line.push(b'\n');
        self.file.write_all(&line).ctx(|| format!("writing {}", self.path.display()))?;
        Ok(self.file.sync_data().ctx(|| format!("syncing {}", self.path.display()))?)
    }

    /// Empties the journal once its update has ended (its `end` record is on disk first, so a
    /// crash here leaves an ended update, which replays as nothing to do).
    pub fn clear(&mut self) -> Result<()> {
        self.file.set_len(0).ctx(|| format!("truncating {}", self.path.display()))?;
        self.file.sync_all().ctx(|| format!("syncing {}", self.path.display()))?;
        sync_parent(&self.path)
    }
}

/// Replays a journal without opening it for writing (for status reports); no journal is no update.
pub fn read_replay(path: &Path) -> Result<Replay> {
    match std::fs::read_to_string(path) {
        Ok(text) => replay(&text, path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Replay::default()),
        Err(e) => Err(fleetdelta_engine::Error::io(format!("reading {}", path.display()), e).into()),
    }
}

fn replay(text: &str, path: &Path) -> Result<Replay> {
    let mut replay = Replay::default();
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    for (n, line) in complete.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: Record = serde_json::from_str(line).map_err(|e| AgentError::Journal { path: path.to_path_buf(), line: n + 1, reason: e.to_string() })?;
        match record {
            Record::Begin { plan } => replay = Replay { plan: Some(plan), ..Replay::default() },
            Record::Begun { service, index, .. } => {
                replay.begun.insert(service, index);
            }
            Record::Done { service, index } => {
                replay.begun.remove(&service);
                replay.done.insert(service, index + 1);
            }
            Record::RolledBack { service, .. } => {
                replay.begun.remove(&service);
                replay.rolled_back.insert(service);
            }
            // The switches it finished are journaled before it; an `end` follows.
            Record::Superseded { .. } => {}
            Record::End => replay = Replay::default(),
        }
    }
    Ok(replay)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> UpdatePlan {
        UpdatePlan { from_release: None, target_release: "2".into(), os_update: None, services: vec![], groups: vec![] }
    }

    #[test]
    fn a_superseded_update_replays_until_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        let (mut j, _) = Journal::open(&path).unwrap();
        j.append(&Record::Begin { plan: plan() }).unwrap();
        j.append(&Record::Done { service: "api".into(), index: 0 }).unwrap();
        j.append(&Record::Superseded { by: "3".into() }).unwrap();
        drop(j);
        // A crash between `superseded` and `end`: the update is still there, to supersede again.
        let (mut j, r) = Journal::open(&path).unwrap();
        assert_eq!(r.plan, Some(plan()));
        assert_eq!(r.done.get("api"), Some(&1));
        j.append(&Record::End).unwrap();
        drop(j);
        assert_eq!(Journal::open(&path).unwrap().1, Replay::default());
    }

    #[test]
    fn replays_steps_and_ignores_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        let (mut j, r) = Journal::open(&path).unwrap();
        assert_eq!(r, Replay::default());
        j.append(&Record::Begin { plan: plan() }).unwrap();
        j.append(&Record::Begun { service: "api".into(), index: 0, step: Step::Fetch }).unwrap();
        j.append(&Record::Done { service: "api".into(), index: 0 }).unwrap();
        j.append(&Record::Begun { service: "api".into(), index: 1, step: Step::Unpack }).unwrap();
        j.append(&Record::RolledBack { service: "web".into(), reason: "x".into() }).unwrap();
        drop(j);
        let mut torn = std::fs::read(&path).unwrap();
        torn.extend_from_slice(br#"{"record":"done","serv"#);
        std::fs::write(&path, &torn).unwrap();
        let (mut j, r) = Journal::open(&path).unwrap();
        assert_eq!(r.plan, Some(plan()));
        assert_eq!(r.done["api"], 1);
        assert_eq!(r.begun["api"], 1);
        assert!(r.rolled_back.contains("web"));
        j.append(&Record::Done { service: "api".into(), index: 1 }).unwrap();
        j.append(&Record::End).unwrap();
        drop(j);
        let (mut j, r) = Journal::open(&path).unwrap();
        assert_eq!(r, Replay::default(), "an ended update replays as nothing");
        j.clear().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }

    #[test]
    fn a_corrupt_middle_line_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        std::fs::write(&path, "{\"record\":\"end\"}\nnonsense\n{\"record\":\"end\"}\n").unwrap();
        let err = Journal::open(&path).unwrap_err().to_string();
        assert!(err.contains("journal.jsonl: line 2"), "{err}");
    }
}
