//! The dtm-rs engine. The service API (`Coordinator`) that the HTTP, gRPC and JSON-RPC
//! adapters call, the per-mode processors (saga, msg, tcc, xa), the recovery loop, and the
//! two seams the engine does its I/O through: [`Store`] and [`BranchCaller`].

pub mod caller;
pub mod error;
mod process;
pub mod recovery;
pub mod service;
pub mod settings;
pub mod stats;
pub mod store;

pub use caller::{BranchCall, BranchCaller};
pub use error::ApiError;
pub use service::{Coordinator, QueryResult};
pub use settings::Settings;
pub use store::{Store, StoreError};

/// A fresh 22-character gid, like dtm's shortuuid (base57 of a random 128-bit value).
pub fn new_gid() -> String {
    const ALPHABET: &[u8] = b"23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
    let mut n = uuid::Uuid::new_v4().as_u128();
    let mut out = Vec::with_capacity(22);
    for _ in 0..22 {
        out.push(ALPHABET[(n % 57) as usize]);
        n /= 57;
    }
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn gids_are_distinct_and_22_chars() {
        let a = super::new_gid();
        let b = super::new_gid();
        assert_eq!(a.len(), 22);
        assert_ne!(a, b);
    }
}
