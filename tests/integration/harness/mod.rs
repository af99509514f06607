//! Shared test support: a real PostgreSQL server, the real app on a random port, and
//! helpers to write source rows and wait on conditions.

pub mod app;
pub mod fixtures;
pub mod postgres;
pub mod wait;
