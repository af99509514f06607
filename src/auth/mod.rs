//! Who may call the service: the cron bearer token for `/sequencer` and `/poller`, and
//! QStash's signature for `/sync-engine`.

pub mod cron;
pub mod qstash;

pub use cron::CronAuth;
