//! The path of a request that carries a key, one concern per file:
//!
//! - [`decide`]: buffers and fingerprints the request, asks the store, and
//!   answers a replay or a conflict without calling the inner service;
//! - [`first_use`]: drives the inner call for a key just acquired and the
//!   store write of its response, and moves them to a task if the client
//!   goes away;
//! - [`respond`]: decides from the response head what is stored, and
//!   stores a whole body at once or hands a streaming one to the capture;
//! - [`capture`]: the response body that streams to the client while a
//!   copy is kept, and finishes in a task when dropped;
//! - [`copy`]: that copy, and the record it becomes;
//! - [`lock`]: the held lock, which completes or releases the key;
//! - [`shared`]: what every clone of one service shares;
//! - [`lease`]: the task that renews the leases of running requests;
//! - [`background`]: store writes that must land even if nobody waits.
//!
//! Each file depends only on files below it in this list (and on the
//! crate's other modules), never on one above: `tests/module_graph.rs`
//! checks that no module of the crate depends on one that depends on it.

pub(crate) mod background;
pub(crate) mod capture;
pub(crate) mod copy;
pub(crate) mod decide;
pub(crate) mod first_use;
pub(crate) mod lease;
pub(crate) mod lock;
pub(crate) mod respond;
pub(crate) mod shared;
